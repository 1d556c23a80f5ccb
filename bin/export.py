"""Thin entry point (also installed as fgr-export).

See fgr_tf/experiment/apps/export.py.
"""

from fgr_tf.experiment.apps import export

if __name__ == "__main__":
  export.run()
