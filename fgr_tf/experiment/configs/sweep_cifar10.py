"""The paper's comparison on CIFAR-10 with the original's protocol (a GPU).

  fgr-sweep --config=configs/sweep_cifar10.py --workdir=runs/c10_sweep
  fgr-sweep --config=configs/sweep_cifar10.py --workdir=runs/c10_sweep_r18 \\
      --config.model.name=resnet18

VGG-11 (or ResNet-18), 80 epochs, batch 128, SGD 0.01 / momentum 0.9 /
weight decay 5e-4, x0.1 at epochs 40 and 60 (configs/default.py), each
variant evaluated on 1,000 test images with flow-PGD (epsilon 0.01 and the
0.005 / 0.02 curve), stAdv, ADef and worst-of-k. Expected from the original
(VGG-11, flow-PGD epsilon 0.01, 100 steps): lambda 0 -> clean 0.903 /
adversarial 0.06; 100 -> 0.872 / 0.48; 200 -> 0.860 / 0.53; 300 -> 0.853 /
0.55. IGR lambdas are matched to FGR 100 / 300 by the ratio of the two
penalties (~20 measured on Fashion-MNIST; check `fgr_penalty / igr_penalty`
in your history.csv). AT: flow-PGD, epsilon 0.01, 10 steps.
"""

import ml_collections

from fgr_tf.experiment.configs import default
from fgr_tf.experiment.configs import sweep_fashion_mnist


def get_config():
  config = default.get_config()
  config.eval.num_examples = 1000
  # The original's protocol: its flow attack reads zeros outside the image.
  config.eval.attacks.flow_pgd.padding = "zeros"
  config.adv.epsilon = 0.01
  config.adv.steps = 10
  config.sweep = ml_collections.ConfigDict()
  config.sweep.variants = sweep_fashion_mnist.paper_variants(fgr_with_at=300)
  config.sweep.only = ""
  config.sweep.seeds = (0,)        # each variant, each seed
  # The bounded attack whose robust accuracy the clean-vs-robust plot uses.
  config.sweep.robust_label = "flow_pgd"
  return config
