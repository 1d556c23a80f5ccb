"""The paper's comparison on CIFAR-10 with the original's protocol (a GPU).

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/sweep_cifar10.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import sweep_cifar10


def get_config():
  return sweep_cifar10.get_config()
