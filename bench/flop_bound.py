"""The FLOP bound of `bench.compare`'s modes on this machine.

  python -m bench.flop_bound [--json]

Images/s that VGG-11 (32x32x3, 10 classes) would reach if every
multiply-add of the mode's necessary work ran at this machine's sustained
float32 matmul rate (`bench.attacks.matmul_gflops`, measured here). With F
the forward FLOPs of one image through the convolutions and dense layers,
counted as direct convolution (2 per multiply-add, padding included):

  eval      F       the forward pass;
  plain     3 F     forward, input gradients, weight gradients;
  fgr       6 F     forward (F) and its input gradients (F) give the flow
                    gradient; the parameter gradient of CE + lambda * penalty
                    goes back through both: through the input-gradient pass
                    (its input and weight gradients, 2 F) and through the
                    forward pass (2 F);
  flow_pgd  20 F    10 steps of forward + input gradient.

Element-wise work (BatchNorm, ReLU, pooling, the warp) is not counted, so
no implementation reaches the bound; a ratio to another implementation
above bound / its images/s would need more than the machine's peak. Fewer
multiplies than direct convolution (Winograd, used by fgr_tf on 4x4 maps)
can beat the bound.
"""

import json
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bench import attacks  # noqa: E402
import fgr_tf  # noqa: E402

WORK = {"eval": 1, "plain": 3, "fgr": 6, "flow_pgd": 20}


def bound_images_per_s(forward_flops, gflops):
  """{mode: images/s at `gflops`} for VGG-11's `forward_flops` per image."""
  return {mode: gflops * 1e9 / (factor * forward_flops)
          for mode, factor in WORK.items()}


def measure():
  """(forward FLOPs per image of VGG-11 at 32x32x3, matmul GFLOP/s)."""
  model = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))
  return attacks.forward_flops(model), attacks.matmul_gflops()


def main(argv):
  del argv
  flops, gflops = measure()
  bound = bound_images_per_s(flops, gflops)
  if flags.FLAGS.json:
    print(json.dumps({"forward_flops": flops, "gflops": gflops,
                      "images_per_s": bound}))
    return
  print(f"VGG-11 forward {flops / 1e6:.1f} MFLOP/image; sustained matmul "
        f"{gflops:.0f} GFLOP/s ({attacks.cpu_model_name()})")
  for mode, rate in bound.items():
    print(f"{mode:<10}{WORK[mode]:>4} F  {rate:>8.1f} images/s")


if __name__ == "__main__":
  flags.DEFINE_bool("json", False, "Print one JSON line.")
  app.run(main)
