"""The cross-entropy's first and second derivatives (fgr_tf.cross_entropy):
the same values as TF's, and accurate in float32 on confident logits."""

import numpy as np
import tensorflow as tf

from fgr_tf import cross_entropy
from helpers import U32

CLASSES = 10


def _tensors(fn, z, labels, cotangent):
  """(loss [B], gradient s [B, C], softmax Hessian times cotangent [B, C])."""
  with tf.GradientTape() as outer:
    outer.watch(z)
    with tf.GradientTape() as inner:
      inner.watch(z)
      loss = fn(z, labels)
      total = tf.reduce_sum(loss)
    s = inner.gradient(total, z)
    product = tf.reduce_sum(s * cotangent)
  return loss, s, outer.gradient(product, z)


def _derivatives(fn, logits, labels, cotangent):
  """`_tensors` eagerly, on arrays."""
  return tuple(t.numpy() for t in _tensors(
      fn, tf.constant(logits), labels, tf.constant(cotangent)))


def _tf_ce(logits, labels):
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def _naive_ce(logits, labels):
  """The textbook formulas (TF's and PyTorch's): s = p - onehot and
  H g = p (g - <p, g>), as autodiff of log_softmax gives them."""
  log_p = tf.nn.log_softmax(logits)
  return -tf.gather(log_p, labels, axis=1, batch_dims=1)


def _case(seed, batch=64, margin=(4.0, 14.0)):
  """Confident logits: one class leads the others by `margin` (so its
  probability is 1 - 1e-2 .. 1 - 1e-6), the label is that class for half
  the examples; a random cotangent; the leading class of each example."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, CLASSES))
  top = rng.integers(0, CLASSES, batch)
  logits[np.arange(batch), top] += rng.uniform(*margin, batch)
  labels = np.where(np.arange(batch) % 2 == 0, top,
                    rng.integers(0, CLASSES, batch)).astype(np.int32)
  return (logits, labels, rng.normal(size=(batch, CLASSES)),
          np.argmax(logits, axis=1))


def test_values_and_derivatives_equal_tf_in_float64():
  for seed in range(3):
    logits, labels, g, _ = _case(seed, margin=(0.0, 3.0))
    ours = _derivatives(cross_entropy.sparse_cross_entropy, logits, labels, g)
    theirs = _derivatives(_tf_ce, logits, labels, g)
    for a, b, what in zip(ours, theirs, ("loss", "gradient", "Hessian")):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max(),
                                 err_msg=what)


def _term_scales(logits, labels, g, top):
  """Per entry, the magnitude of the terms each derivative is an exact sum
  of (so float32 may be off by a few u times it): s_y = -sum_{j != y} p_j,
  s_j = p_j; (H g)_j = p_j ((g_j - g_m) - sum_{k != m} p_k (g_k - g_m))."""
  z = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  rows = np.arange(len(labels))
  is_label = np.zeros_like(p, bool)
  is_label[rows, labels] = True
  s_scale = np.where(is_label, (p * ~is_label).sum(1, keepdims=True), p)
  g_m = np.abs(g[rows, top])[:, None]
  not_top = np.ones_like(p, bool)
  not_top[rows, top] = False
  mixed = (p * not_top * (np.abs(g) + g_m)).sum(1, keepdims=True)
  h_scale = p * (not_top * (np.abs(g) + g_m) + mixed)
  return s_scale, h_scale


def test_confident_derivatives_are_accurate_in_float32():
  """Each entry to 10 u (sqrt(C) + max_j |z_j - max z|) of its own
  terms' magnitude (sums of C terms; exp(z_j - max z) turns the rounding
  of its argument into a relative error |z_j - max z| u; see
  helpers.assert_close_float32 for the factor 10), while the textbook
  formulas miss it by u / (1 - p_max) on the leading class."""
  naive_worst = 0.0
  for seed in range(3):
    logits, labels, g, top = _case(seed)
    # float64 on the float32-rounded inputs: what remains is the formulas'.
    logits = logits.astype(np.float32).astype(np.float64)
    g = g.astype(np.float32).astype(np.float64)
    s_scale, h_scale = _term_scales(logits, labels, g, top)
    spread = np.ptp(logits, axis=1, keepdims=True)
    bound = 10 * U32 * (np.sqrt(CLASSES) + spread)
    _, s64, h64 = _derivatives(cross_entropy.sparse_cross_entropy, logits,
                               labels, g)
    for fn in (cross_entropy.sparse_cross_entropy, _naive_ce):
      _, s32, h32 = _derivatives(fn, logits.astype(np.float32), labels,
                                 g.astype(np.float32))
      worst = max(np.max(np.abs(s32 - s64) / s_scale / bound),
                  np.max(np.abs(h32 - h64) / h_scale / bound))
      if fn is _naive_ce:
        naive_worst = max(naive_worst, worst)
      else:
        assert worst <= 1.0, (seed, worst)
  # The check has teeth: the textbook formulas fail it on these logits.
  assert naive_worst > 100, naive_worst


def test_xla_gives_the_same_derivatives():
  logits, labels, g, top = _case(0)
  logits, g = logits.astype(np.float32), g.astype(np.float32)
  loss, s, h = _derivatives(cross_entropy.sparse_cross_entropy, logits,
                            labels, g)

  xla = tf.function(
      lambda z, y, c: _tensors(cross_entropy.sparse_cross_entropy, z, y, c),
      jit_compile=True)
  loss_x, s_x, h_x = (t.numpy() for t in xla(
      tf.constant(logits), tf.constant(labels), tf.constant(g)))
  s_scale, h_scale = _term_scales(logits.astype(np.float64), labels,
                                  g.astype(np.float64), top)
  # Two float32 runs (XLA's exp and sums against Eigen's): twice the bound
  # of the test above; the loss (a log of a sum) against 1 + |loss|.
  bound = 20 * U32 * (np.sqrt(CLASSES) + np.ptp(logits, axis=1,
                                                keepdims=True))
  assert np.all(np.abs(loss_x - loss) <= bound[:, 0] * (1 + np.abs(loss)))
  assert np.all(np.abs(s_x - s) <= bound * s_scale)
  assert np.all(np.abs(h_x - h) <= bound * h_scale)
