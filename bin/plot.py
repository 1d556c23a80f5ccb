"""Thin entry point: see fgr_tf/apps/plot.py (also installed as fgr-plot)."""

from fgr_tf.apps import plot

if __name__ == "__main__":
  plot.run()
