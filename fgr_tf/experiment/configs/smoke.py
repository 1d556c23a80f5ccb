"""Seconds-long end-to-end run on synthetic data (tests, first try-out)."""

from fgr_tf.experiment.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.num_train_examples = 256
  config.data.num_val_examples = 64
  config.model.name = "small_cnn"
  config.train.epochs = 2
  config.train.batch_size = 64
  config.train.lr_decay_epochs = (1,)
  config.train.verbose = 0
  config.fgr.lam = 10.0
  config.eval.num_examples = 32
  config.eval.batch_size = 32
  config.eval.attacks.flow_pgd.steps = 3
  config.eval.attacks.stadv.steps = 5
  config.eval.attacks.stadv.search_steps = 1
  config.eval.attacks.adef.max_iter = 3
  config.eval.attacks.worst_of_k.grid = False
  config.eval.attacks.worst_of_k.tries = 2
  config.eval.callback.every_n_epochs = 1
  config.eval.callback.num_examples = 16
  config.eval.callback.attacks.adef.max_iter = 3
  config.eval.flow_pgd_budgets = (0.05,)
  return config
