"""Seconds-long end-to-end run on synthetic data (tests, first try-out).

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/smoke.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import smoke


def get_config():
  return smoke.get_config()
