"""A seconds-long sweep on synthetic data (tests of `fgr-sweep`).

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/sweep_smoke.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import sweep_smoke


def get_config():
  return sweep_smoke.get_config()
