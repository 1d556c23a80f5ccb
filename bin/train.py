"""Thin entry point (also installed as fgr-train).

See fgr_tf/experiment/apps/train.py.
"""

from fgr_tf.experiment.apps import train

if __name__ == "__main__":
  train.run()
