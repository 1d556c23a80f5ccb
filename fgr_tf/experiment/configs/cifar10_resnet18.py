"""CIFAR-10 ResNet-18 with the original's schedule (for a GPU)."""

from fgr_tf.experiment.configs import default


def get_config():
  config = default.get_config()
  config.model.name = "resnet18"
  return config
