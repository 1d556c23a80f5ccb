"""The quickstart (`make demo`): Fashion-MNIST, 3 epochs, 500 test images.

Run twice, with --config.fgr.lam=0 (baseline) and as is (FGR, lambda 100).
"""

from fgr_tf.experiment.configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.train.epochs = 3
  config.train.lr_decay_epochs = (2,)
  config.eval.num_examples = 500
  return config
