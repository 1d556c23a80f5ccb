"""The original's CIFAR-10 setting: VGG-11 with FGR (SPEC §1).

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/default.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import default


def get_config():
  return default.get_config()
