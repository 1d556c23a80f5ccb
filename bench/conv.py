"""One 3x3 "same" convolution: oneDNN's kernel against the matmul form.

  python -m bench.conv

For each of VGG-11's feature-map shapes at batch 128, times (ms, median of
--repeats) the forward pass, forward + both gradients, and the FGR-like
second-order step (the gradient w.r.t. the kernel of the squared input
gradient of sum(conv(x)^2 * upstream)), for `tf.nn.conv2d` and `fgr_tf.backbones.gemm_conv.conv3x3_same`,
and prints the largest difference of the second-order kernel gradients.
`gemm_conv.Conv2D` takes the matmul form up to `GEMM_MAX_PIXELS` pixels.
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


def run(shapes, batch, repeats):
  """[(shape, oneDNN (fwd, first, second) ms, matmul (...) ms, diff)]."""
  rng = np.random.default_rng(0)
  rows = []
  for size, cin, cout in shapes:
    x = tf.constant(rng.normal(size=(batch, size, size, cin)), tf.float32)
    kernel = tf.Variable(rng.normal(size=(3, 3, cin, cout)) * 0.05,
                         dtype=tf.float32)
    upstream = tf.constant(rng.normal(size=(batch, size, size, cout)),
                           tf.float32)
    timings, grads = [], []
    for conv in (onednn_conv, gemm_conv.conv3x3_same):
      steps = make_steps(conv, x, kernel, upstream)
      timings.append(tuple(timing.median_ms(s, repeats) for s in steps))
      grads.append(steps[2]().numpy())
    diff = np.abs(grads[1] - grads[0]).max() / np.abs(grads[0]).max()
    rows.append(((size, cin, cout), timings[0], timings[1], diff))
  return rows


def main(argv):
  del argv
  print(f"3x3 same conv, batch {flags.FLAGS.batch}, ms (median of "
        f"{flags.FLAGS.repeats}): forward / fwd+grads / second order")
  for (size, cin, cout), onednn, matmul, diff in run(
      SHAPES, flags.FLAGS.batch, flags.FLAGS.repeats):
    print(f"{size}x{size} {cin}->{cout}: conv2d " +
          " / ".join(f"{t:.1f}" for t in onednn) + "  matmul " +
          " / ".join(f"{t:.1f}" for t in matmul) + f"  diff {diff:.1e}")


if __name__ == "__main__":
  flags.DEFINE_integer("batch", 128, "Batch size.")
  flags.DEFINE_integer("repeats", 10, "Timed steps.")
  app.run(main)
