"""A seconds-long sweep on synthetic data (tests of `fgr-sweep`)."""

import ml_collections

from fgr_tf.experiment.configs import smoke


def get_config():
  config = smoke.get_config()
  config.train.epochs = 1
  config.adv.steps = 2
  config.eval.callback.every_n_epochs = 0  # the sweep's tests need no callback
  # One bounded and one minimal attack: what the report and the plots
  # need (each attack traces once per trained model: 6 in the tests).
  del config.eval.attacks["stadv"]
  del config.eval.attacks["worst_of_k"]
  config.sweep = ml_collections.ConfigDict()
  # (name, overrides) pairs, in report order.
  config.sweep.variants = (
      ("baseline", "fgr.lam=0"),
      ("fgr10", "fgr.lam=10.0"),
      ("fgr10_at", "fgr.lam=10.0 adv.attack=flow_pgd"),
  )
  config.sweep.only = ""
  config.sweep.seeds = (0,)        # each variant, each seed
  # The bounded attack whose robust accuracy the clean-vs-robust plot uses.
  config.sweep.robust_label = "flow_pgd"
  return config
