"""Train-mode batch normalization with hand-written first and second
derivatives, in plain TF ops (the same numbers on CPU, GPU and XLA); the
second derivative's full-size elementwise passes run as one XLA
computation (`ELEMENTWISE`), its sums stay TF's.

FGR differentiates the input gradient w.r.t. the weights, so the training
step needs d(BatchNorm backward) / d(x, gamma, dy). TF's autodiff of the
unfused formula gets there with ~20 ops per pass; the derivatives are
written out here instead (per channel, N values, x_c = x - mu,
x_hat = x_c r, r = 1 / sqrt(var + eps), biased var):

  backward:  dbeta = sum(dy), dgamma = sum(dy x_hat),
             dx = g r (dy - dbeta / N - x_hat dgamma / N)
  its gradient, for cotangents E (of dx), e_g (of dgamma), e_b (of dbeta):
    d dy    = g r (E - mean(E) - x_hat mean(E x_hat)) + e_g x_hat + e_b
    d gamma = r sum(E (dy - dbeta / N - x_hat dgamma / N))
    d x     = r (G - mean(G) - x_hat mean(G x_hat)) - R r^2 x_hat / N
      with G = -g r (dgamma / N E + mean(E x_hat) dy) + e_g dy  (d/d x_hat)
      and  R = g d gamma / r                                 (d/d r)

Accuracy: every difference is formed before it is scaled or summed
(dy - mean(dy), E - mean(E), x - mu), never as a difference of large
terms. Statistics in two passes: the variance is mean((x - mu)^2), never
E[x^2] - E[x]^2. The one-pass form cancels on channels whose mean is large
against their spread (a first convolution of [0, 1] images): XLA lowers
TF's FusedBatchNormV3 to exactly that form, and ResNet-18's FGR gradients
came out 7e-4 (of their largest entry) off float64 under XLA with it,
against 8e-5 here. Every sum over x_hat is a sum over x_c for the same
reason.

Not TF's fused kernels (oneDNN/cuDNN) outside XLA either: measured on a
2-core Xeon (AVX-512), they made plain small-CNN / VGG-11 steps 16% / 7%
faster but FGR steps 6% / 3% slower, with 2-8x larger errors against
float64 (their channel sums accumulate sequentially).

Tested against the unfused float64 layer and the original's golden
parameter gradients (tests/test_models.py, tests/test_regularizers.py).
Third derivatives are not provided (nothing in fgr_tf needs them).
"""

import tensorflow as tf
# pylint: disable-next=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_util

from fgr_tf import environment

_AXES = (0, 1, 2)


def _in_xla():
  return control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph())


def _channel_sum(v):
  """Per-channel sum of [B, H, W, C] over B, H and W, accurately.

  A single float32 reduction over B * H * W values accumulates
  sequentially on CPU (TF and XLA alike): a sum of 32 * 32 * 32 positive
  terms came out 3.7e-5 (relative) off, which made BatchNorm's gamma
  gradients of the FGR objective 4e-4 off float64 (VGG-13, batch 32).
  Summing W, then H, then B keeps each accumulation short (2e-7); XLA
  fuses such stages back into one reduction, so under XLA the sum
  accumulates in float64 instead (fused: memory traffic unchanged; not on
  TPUs, which have no float64).
  """
  if _in_xla() and not tf.config.list_logical_devices("TPU"):
    return tf.cast(tf.reduce_sum(tf.cast(v, tf.float64), _AXES), v.dtype)
  return tf.reduce_sum(tf.reduce_sum(tf.reduce_sum(v, 2), 1), 0)


def _zeros_if_none(value, like):
  return tf.zeros_like(like) if value is None else value


def train_batch_norm(x, gamma, beta, epsilon):
  """Batch-statistics BatchNorm of NHWC float32 `x`.

  Args:
    x: [B, H, W, C] float32.
    gamma, beta: [C] float32 scale and offset.
    epsilon: float added to the variance.

  Returns:
    (y [B, H, W, C], batch mean [C], biased batch variance [C]); the
    statistics are for the moving averages and carry no gradient. `y` has
    exact first and second derivatives w.r.t. x, gamma and beta.
  """

  @tf.custom_gradient
  def normalize(x, gamma, beta):
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
    mean = _channel_sum(x) / count
    centred = x - mean
    variance = _channel_sum(tf.square(centred)) / count
    rstd = tf.math.rsqrt(variance + epsilon)
    y = centred * (gamma * rstd) + beta
    stats = (tf.stop_gradient(mean), tf.stop_gradient(variance))

    def grad(dy, unused_dmean=None, unused_dvar=None):
      return _backward(dy, x, gamma, centred, rstd, count)

    return (y,) + stats, grad

  return normalize(x, gamma, beta)


def _backward(dy, x, gamma, centred, rstd, count):
  """(dx, dgamma, dbeta) with its own hand-written gradient.

  `centred` (x - mean) and `rstd` are the forward pass's; their dependence
  on x is in the gradient's formulas.
  """

  @tf.custom_gradient
  def backward(dy, x, gamma):
    del x  # enters through centred and rstd
    dbeta = _channel_sum(dy)
    m1 = dbeta / count                                   # mean(dy)
    dy_c = dy - m1          # centred first: dy often has a large mean
    sum_dy_centred = _channel_sum(dy * centred)
    dgamma = rstd * sum_dy_centred
    m2 = dgamma / count                                  # mean(dy x_hat)
    # dy - mean(dy) - x_hat mean(dy x_hat): dx / (g r), reused below.
    inner = dy_c - centred * (rstd * m2)
    dx = (gamma * rstd) * inner

    def grad(e, e_gamma=None, e_beta=None):
      return _second_order(e, _zeros_if_none(e_gamma, gamma),
                           _zeros_if_none(e_beta, gamma), dy_c, inner,
                           centred, rstd, gamma, m2, count)

    return (dx, dgamma, dbeta), grad

  return backward(dy, x, gamma)


def _second_order(e, e_gamma, e_beta, dy_c, inner, centred, rstd, gamma, m2,
                  count):
  """(d dy, d x, d gamma) of BatchNorm's backward for cotangents (e, e_gamma,
  e_beta) of (dx, dgamma, dbeta): the formulas of the module docstring."""
  gr = gamma * rstd
  mean_e = _channel_sum(e) / count
  mean_e_xhat = rstd * _channel_sum(e * centred) / count

  # k = e_gamma - gr mean(E x_hat): the coefficient of x_hat in d dy
  # and of dy in G.
  k = e_gamma - gr * mean_e_xhat

  # r sum(E (dy - mean(dy) - x_hat mean(dy x_hat))): one sum, not a
  # difference of sums (which would cancel).
  d_gamma = rstd * _channel_sum(e * inner)

  # G = alpha E + k dy (d/d x_hat); R = g d_gamma / r (d/d r);
  # G - mean(G) = alpha (E - mean(E)) + k (dy - mean(dy)).
  alpha = -gr * m2
  mean_g_xhat = alpha * mean_e_xhat + k * m2
  r_term = gamma * d_gamma / rstd
  c_xhat = -rstd * mean_g_xhat - r_term * rstd * rstd / count
  outputs = (_second_order_outputs_by_xla if ELEMENTWISE == "xla" else
             _second_order_outputs)
  d_dy, d_x = outputs(
      e, mean_e, dy_c, centred, gr, k * rstd, e_beta, rstd * alpha,
      rstd * k, c_xhat * rstd)
  return d_dy, d_x, d_gamma


# The second derivative's full-size elementwise passes (each [B, H, W, C]
# tensor against per-channel [C] coefficients): TF runs every broadcast
# multiply or add as its own pass over memory, XLA fuses them into one loop
# (the channel sums stay TF's: XLA's CPU reductions measured 7x slower and
# less accurate). Measured alone (Xeon, AVX-512, ms, TF ops / XLA): 52 / 28,
# 21 / 13, 7.3 / 3.8 at [128, 32, 32, 64], [128, 16, 16, 128],
# [128, 8, 8, 256]; VGG-11's FGR step 1.005-1.011x faster with AVX-512,
# 1.02x with AVX2 (`python -m bench.switches --switch=bn_second
# --modes=fgr --paired_rounds=12`). The
# forward and first backward passes have fewer broadcasts and measured
# level (or slower) compiled, so they stay TF ops.
# FGR_TF_BATCH_NORM_ELEMENTWISE="ops" runs these as TF ops too.
ELEMENTWISE = environment.choice("FGR_TF_BATCH_NORM_ELEMENTWISE", "xla",
                                 ("xla", "ops"))


def _second_order_outputs(e, mean_e, dy_c, centred, gr, k_r, e_beta, a, b,
                          c):
  """(d dy, d x) of `_second_order`:
  d dy = gr (E - mean(E)) + k x_hat + e_beta,
  d x  = r alpha (E - mean(E)) + r k dy_c + c_xhat r x_c."""
  e_c = e - mean_e
  return gr * e_c + (centred * k_r + e_beta), a * e_c + b * dy_c + centred * c


_second_order_outputs_by_xla = tf.function(
    _second_order_outputs, jit_compile=True, autograph=False)
