"""Fashion-MNIST small CNN: the offline data set (Debian dataset-fashion-mnist).

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/fashion_mnist.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import fashion_mnist


def get_config():
  return fashion_mnist.get_config()
