"""Thin entry point: see fgr_tf/apps/evaluate.py (also installed as fgr-evaluate)."""

from fgr_tf.apps import evaluate

if __name__ == "__main__":
  evaluate.run()
