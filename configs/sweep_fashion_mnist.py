"""The paper's comparison on Fashion-MNIST (small CNN), for `fgr-sweep`.

The settings live in the package (importable, no sys.path changes):
  fgr_tf/experiment/configs/sweep_fashion_mnist.py
Override any field on the command line: --config.<field>=<value>.
"""

from fgr_tf.experiment.configs import sweep_fashion_mnist


def get_config():
  return sweep_fashion_mnist.get_config()
