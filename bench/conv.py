"""One 3x3 "same" convolution: oneDNN's kernel against the matmul forms.

  python -m bench.conv

For each of VGG-11's feature-map shapes at batch 128, times (ms, median
of interleaved rounds) the forward pass, forward + both gradients, and the
FGR-like second-order step (the gradient w.r.t. the kernel of the squared
input gradient of sum(conv(x)^2 * upstream)) for oneDNN's `tf.nn.conv2d`,
the im2col / dense matmul form and the Winograd form
(`fgr_tf.backbones.gemm_conv.conv3x3_same`), and prints the largest
difference of the second-order kernel gradients from conv2d's.
`gemm_conv.Conv2D` takes the matmul forms up to `GEMM_MAX_PIXELS` pixels.
"""

import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import timing  # noqa: E402
from fgr_tf.backbones import gemm_conv  # noqa: E402

# (height = width, input channels, output channels) of VGG-11 at 32x32.
SHAPES = ((16, 64, 128), (8, 128, 256), (8, 256, 256), (4, 256, 512),
          (4, 512, 512), (2, 512, 512))


def onednn_conv(x, kernel):
  return tf.nn.conv2d(x, kernel, 1, "SAME")


def make_steps(conv, x, kernel, upstream):
  """(forward, forward + gradients, second order): tf.functions."""

  def forward():
    return conv(x, kernel)

  def first():
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = conv(x, kernel)
    return tape.gradient(y, [x, kernel], upstream)

  def second():
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        inner.watch(x)
        # Smooth (no ReLU): a ReLU kink flipped by float32 round-off would
        # make the two forms' second derivatives differ at one element.
        loss = tf.reduce_sum(tf.square(conv(x, kernel)) * upstream)
      input_grad = inner.gradient(loss, x)
      penalty = tf.reduce_sum(tf.square(input_grad))
    return outer.gradient(penalty, kernel)

  return tf.function(forward), tf.function(first), tf.function(second)


# name -> 3x3 "same" convolution; the matmul forms as `gemm_conv.Conv2D`
# picks them (the dense form on maps of <= DENSE_MAX_PIXELS pixels).
FORMS = {
    "conv2d": onednn_conv,
    "im2col": lambda x, k: gemm_conv.conv3x3_same(x, k, use_winograd=False),
    "winograd": gemm_conv.conv3x3_same,
}


def run(shapes, batch, repeats, rounds=3):
  """[(shape, {form: (fwd, first, second) ms}, {form: diff})]: medians over
  `rounds` interleaved rounds of `repeats` steps; diff = largest difference
  of the second-order kernel gradient from conv2d's / its max."""
  rng = np.random.default_rng(0)
  rows = []
  for size, cin, cout in shapes:
    x = tf.constant(rng.normal(size=(batch, size, size, cin)), tf.float32)
    kernel = tf.Variable(rng.normal(size=(3, 3, cin, cout)) * 0.05,
                         dtype=tf.float32)
    upstream = tf.constant(rng.normal(size=(batch, size, size, cout)),
                           tf.float32)
    steps = {name: make_steps(conv, x, kernel, upstream)
             for name, conv in FORMS.items()}
    grads = {name: s[2]().numpy() for name, s in steps.items()}
    times = {name: [[] for _ in range(3)] for name in FORMS}
    for _ in range(rounds):
      for name, form_steps in steps.items():
        for i, step in enumerate(form_steps):
          times[name][i].append(timing.median_ms(step, repeats))
    reference = grads["conv2d"]
    rows.append((
        (size, cin, cout),
        {name: tuple(float(np.median(t)) for t in ts)
         for name, ts in times.items()},
        {name: float(np.abs(g - reference).max() / np.abs(reference).max())
         for name, g in grads.items() if name != "conv2d"}))
  return rows


def main(argv):
  del argv
  print(f"3x3 same conv, batch {flags.FLAGS.batch}, ms (median of "
        f"{flags.FLAGS.rounds} rounds of {flags.FLAGS.repeats}): forward / "
        "fwd+grads / second order; diff: second order vs conv2d")
  for (size, cin, cout), times, diffs in run(
      SHAPES, flags.FLAGS.batch, flags.FLAGS.repeats, flags.FLAGS.rounds):
    print(f"{size}x{size} {cin}->{cout}: " + "  ".join(
        f"{name} " + " / ".join(f"{t:.1f}" for t in ts)
        for name, ts in times.items()) + "  diff " + " ".join(
            f"{name} {d:.1e}" for name, d in diffs.items()))


if __name__ == "__main__":
  flags.DEFINE_integer("batch", 128, "Batch size.")
  flags.DEFINE_integer("repeats", 5, "Timed steps per round.")
  flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
  app.run(main)
