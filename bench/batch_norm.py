"""BatchNorm alone: first- and second-order step time per implementation.

  python -m bench.batch_norm --shape 128,32,32,64

Times, in a tf.function, (1) the gradient of sum(relu(bn(x)) * w) w.r.t.
gamma and beta, and (2) the FGR-like second-order step: the gradient of
that loss plus the squared norm of its input gradient, w.r.t. gamma and
beta. Implementations: "keras_formula" (mean / variance / normalize as
unfused ops, differentiated by TF: what the unfused path of
`fgr_tf.backbones.batch_norm` does), "tf_fused" (TF's `FusedBatchNormV3` with
TF's registered gradients, whose second derivative re-derives the backward
pass with unfused ops; not exact under XLA), "fgr_tf"
(`train_batch_norm.train_batch_norm`: two-pass statistics, hand-written
first and second derivatives in plain ops). Prints ms (median of
--repeats) and the largest gradient difference from keras_formula.
"""

import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import timing  # noqa: E402
from fgr_tf.backbones import train_batch_norm  # noqa: E402

EPSILON = 1e-5


def keras_formula(x, gamma, beta):
  mean = tf.reduce_mean(x, [0, 1, 2], keepdims=True)
  variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2], keepdims=True)
  inv = tf.math.rsqrt(variance + EPSILON) * gamma
  return x * inv + (beta - mean * inv)


def tf_fused(x, gamma, beta):
  empty = tf.zeros([0])
  return tf.raw_ops.FusedBatchNormV3(
      x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
      epsilon=EPSILON, is_training=True, data_format="NHWC")[0]


def fgr_tf(x, gamma, beta):
  return train_batch_norm.train_batch_norm(x, gamma, beta, EPSILON)[0]


IMPLEMENTATIONS = {"keras_formula": keras_formula, "tf_fused": tf_fused,
                   "fgr_tf": fgr_tf}


def make_steps(norm, x, weights, gamma, beta):
  """(first-order step, second-order step): tf.functions -> [dgamma, dbeta]."""

  def loss_of(x):
    return tf.reduce_sum(tf.nn.relu(norm(x, gamma, beta)) * weights)

  @tf.function
  def first():
    with tf.GradientTape() as tape:
      loss = loss_of(x)
    return tape.gradient(loss, [gamma, beta])

  @tf.function
  def second():
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        inner.watch(x)
        loss = loss_of(x)
      total = loss + tf.reduce_sum(tf.square(inner.gradient(loss, x)))
    return outer.gradient(total, [gamma, beta])

  return first, second


def run(shape, repeats):
  """{name: (first-order ms, second-order ms, max rel grad diff)}."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=shape).astype(np.float32))
  weights = tf.constant(rng.normal(size=shape).astype(np.float32))
  gamma = tf.Variable(rng.uniform(0.5, 2, size=shape[-1]).astype(np.float32))
  beta = tf.Variable(rng.normal(size=shape[-1]).astype(np.float32))
  results, reference = {}, None
  for name, norm in IMPLEMENTATIONS.items():
    first, second = make_steps(norm, x, weights, gamma, beta)
    grads = [g.numpy() for g in second()]
    reference = reference or grads
    diff = max(np.abs(a - b).max() / np.abs(b).max()
               for a, b in zip(grads, reference))
    results[name] = (timing.median_ms(first, repeats),
                     timing.median_ms(second, repeats),
                     diff)
  return results


def main(argv):
  del argv
  shape = tuple(int(d) for d in flags.FLAGS.shape)
  print(f"BatchNorm on {shape}, ms per step (median of {flags.FLAGS.repeats})")
  print(f"{'implementation':<16}{'1st order':>11}{'2nd order':>11}"
        f"{'grad diff':>11}")
  for name, (first, second, diff) in run(shape, flags.FLAGS.repeats).items():
    print(f"{name:<16}{first:>11.1f}{second:>11.1f}{diff:>11.1e}")


if __name__ == "__main__":
  flags.DEFINE_list("shape", ["128", "32", "32", "64"], "NHWC shape.")
  flags.DEFINE_integer("repeats", 7, "Timed steps.")
  app.run(main)
