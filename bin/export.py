"""Thin entry point: see fgr_tf/apps/export.py (also installed as fgr-export)."""

from fgr_tf.apps import export

if __name__ == "__main__":
  export.run()
