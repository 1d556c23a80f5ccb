"""Thin entry point: see fgr_tf/apps/sweep.py (also installed as fgr-sweep)."""

from fgr_tf.apps import sweep

if __name__ == "__main__":
  sweep.run()
