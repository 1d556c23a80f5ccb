"""The quickstart (`make demo`): Fashion-MNIST, 3 epochs, 500 test images.

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/fashion_mnist_demo.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import fashion_mnist_demo


def get_config():
  return fashion_mnist_demo.get_config()
