"""The original's CIFAR-100 setting: VGG-11, same schedule as CIFAR-10."""

from fgr_tf.experiment.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar100"
  return config
