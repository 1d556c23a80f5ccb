"""Thin entry point (also installed as fgr-sweep).

See fgr_tf/experiment/apps/sweep.py.
"""

from fgr_tf.experiment.apps import sweep

if __name__ == "__main__":
  sweep.run()
