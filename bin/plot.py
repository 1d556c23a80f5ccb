"""Thin entry point (also installed as fgr-plot).

See fgr_tf/experiment/apps/plot.py.
"""

from fgr_tf.experiment.apps import plot

if __name__ == "__main__":
  plot.run()
