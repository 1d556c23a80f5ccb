"""Thin entry point (also installed as fgr-evaluate).

See fgr_tf/experiment/apps/evaluate.py.
"""

from fgr_tf.experiment.apps import evaluate

if __name__ == "__main__":
  evaluate.run()
