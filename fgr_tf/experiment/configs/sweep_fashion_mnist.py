"""The paper's comparison on Fashion-MNIST (small CNN), for `fgr-sweep`.

  fgr-sweep --config=configs/sweep_fashion_mnist.py --workdir=runs/sweep

Variants: baseline; IGR over a lambda sweep (1000 to 6000: its clean
accuracy brackets FGR's, so the two are compared at matched clean
accuracy on the clean-vs-robust curves); FGR 100 / 200 / 300 (the
original's lambdas); flow-PGD adversarial training (AT, epsilon 0.01
normalized, 5 steps); FGR 100 + AT. Each with seeds 0, 1, 2 (mean +-
standard deviation), evaluated with the same attacks and budgets on the
first 500 test images. 3 epochs keep the whole sweep near two hours on 2
CPU cores; rerun with a larger --config.train.epochs where you have more
time.
"""

import ml_collections

from fgr_tf.experiment.configs import fashion_mnist


def paper_variants(fgr_with_at, igr=(1000, 2000, 4000, 6000),
                   fgr=(100, 200, 300)):
  """(name, overrides) pairs, in report order: baseline, IGR, FGR, flow-PGD
  AT (the config's adv section) and FGR(`fgr_with_at`) + AT."""
  return (("baseline", "fgr.lam=0"),
          *((f"igr{lam}", f"fgr.lam=0 igr.lam={lam}") for lam in igr),
          *((f"fgr{lam}", f"fgr.lam={lam}") for lam in fgr),
          ("at", "fgr.lam=0 adv.attack=flow_pgd"),
          (f"fgr{fgr_with_at}_at",
           f"fgr.lam={fgr_with_at} adv.attack=flow_pgd"))


def get_config():
  config = fashion_mnist.get_config()
  config.train.epochs = 3
  config.train.lr_decay_epochs = (2,)
  config.eval.num_examples = 500
  config.adv.epsilon = 0.01
  config.adv.steps = 5
  config.sweep = ml_collections.ConfigDict()
  config.sweep.variants = paper_variants(fgr_with_at=100)
  config.sweep.only = ""   # e.g. --config.sweep.only=baseline,fgr100
  config.sweep.seeds = (0, 1, 2)        # each variant, each seed
  # The bounded attack whose robust accuracy the clean-vs-robust plot uses.
  config.sweep.robust_label = "flow_pgd"
  return config
