"""CIFAR-10 ResNet-18 with the original's schedule (for a GPU).

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/cifar10_resnet18.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import cifar10_resnet18


def get_config():
  return cifar10_resnet18.get_config()
