"""The original's CIFAR-100 setting: VGG-11, same schedule as CIFAR-10.

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/cifar100_vgg11.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import cifar100_vgg11


def get_config():
  return cifar100_vgg11.get_config()
