"""Fashion-MNIST small CNN: the offline data set (Debian dataset-fashion-mnist).

Minutes per epoch on 2 CPU cores. Attack budgets are those of the original
(epsilon 0.01 normalized = 0.135 px at 28x28) plus larger curves.
"""

from fgr_tf.experiment.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "fashion_mnist"
  config.model.name = "small_cnn"
  config.train.epochs = 10
  config.train.lr_decay_epochs = (5, 8)
  config.fgr.lam = 100.0
  config.eval.flow_pgd_budgets = (0.02, 0.05)
  config.eval.callback.every_n_epochs = 1
  return config
