"""Thin entry point: see fgr_tf/apps/train.py (also installed as fgr-train)."""

from fgr_tf.apps import train

if __name__ == "__main__":
  train.run()
