"""Train-mode batch normalization on TF's fused kernels, with a hand-written
second derivative.

FGR differentiates the input gradient w.r.t. the weights, so the training
step needs d(BatchNorm backward) / d(x, gamma, dy). The forward pass and the
first backward pass run TF's fused kernels (`FusedBatchNormV3`,
`FusedBatchNormGradV3`: oneDNN on CPU, cuDNN on GPU). TF's own gradient of
`FusedBatchNormGradV3` re-derives the backward pass with ~20 unfused ops
and differentiates those; here it is written out (per channel, N values,
x_hat = (x - mu) r, r = 1 / sqrt(var + eps), biased var):

  backward:  dbeta = sum(dy), dgamma = sum(dy x_hat),
             dx = g r (dy - dbeta / N - x_hat dgamma / N)
  its gradient, for cotangents E (of dx), e_g (of dgamma), e_b (of dbeta):
    d dy    = g r (E - mean(E) - x_hat mean(E x_hat)) + e_g x_hat + e_b
    d gamma = r sum(E (dy - dbeta / N - x_hat dgamma / N))
    d x     = r (G - mean(G) - x_hat mean(G x_hat)) - R r^2 x_hat / N
      with G = -g r (dgamma / N E + mean(E x_hat) dy) + e_g dy  (d/d x_hat)
      and  R = g d gamma / r                                 (d/d r)

Tested against the unfused float64 layer and the original's golden
parameter gradients (tests/test_models.py, tests/test_regularizers.py).
Third derivatives are not provided (nothing in fgr_tf needs them).
"""

import tensorflow as tf

_AXES = (0, 1, 2)


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
    empty = tf.zeros([0], tf.float32)
    y, mean, unbiased_var, r1, r2, r3 = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
        epsilon=epsilon, is_training=True, data_format="NHWC")
    count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    variance = unbiased_var * (count - 1.0) / tf.maximum(count, 1.0)
    stats = (tf.stop_gradient(mean), tf.stop_gradient(variance))
    rstd = tf.math.rsqrt(variance + epsilon)

    def grad(dy, unused_dmean=None, unused_dvar=None):
      return _backward(dy, x, gamma, mean, rstd, count, (r1, r2, r3),
                       epsilon)

    return (y,) + stats, grad

  return normalize(x, gamma, beta)


def _backward(dy, x, gamma, mean, rstd, count, reserve, epsilon):
  """(dx, dgamma, dbeta) by `FusedBatchNormGradV3`, with its gradient."""

  @tf.custom_gradient
  def backward(dy, x, gamma):
    dx, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy, x=x, scale=gamma, reserve_space_1=reserve[0],
        reserve_space_2=reserve[1], reserve_space_3=reserve[2],
        epsilon=epsilon, is_training=True, data_format="NHWC")

    def grad(e, e_gamma=None, e_beta=None):
      e_gamma = _zeros_if_none(e_gamma, gamma)
      e_beta = _zeros_if_none(e_beta, gamma)
      m1 = dbeta / count            # mean(dy)
      m2 = dgamma / count           # mean(dy x_hat)
      gr = gamma * rstd
      # x_hat = x r + shift; sums over x_hat from sums over x.
      shift = -mean * rstd
      sum_e = tf.reduce_sum(e, _AXES)
      sum_e_xhat = rstd * tf.reduce_sum(e * x, _AXES) + shift * sum_e
      sum_e_dy = tf.reduce_sum(e * dy, _AXES)
      mean_e, mean_e_xhat = sum_e / count, sum_e_xhat / count

      # k = e_gamma - gr mean(E x_hat): the coefficient of x_hat in d dy
      # and of dy in G.
      k = e_gamma - gr * mean_e_xhat
      # d dy = gr E + k x_hat + e_beta - gr mean(E)
      d_dy = gr * e + (x * (k * rstd) + (k * shift + e_beta - gr * mean_e))

      d_gamma = rstd * (sum_e_dy - m1 * sum_e - m2 * sum_e_xhat)

      # G = alpha E + k dy (d/d x_hat); R = g d_gamma / r (d/d r).
      alpha = -gr * m2
      mean_g = alpha * mean_e + k * m1
      mean_g_xhat = alpha * mean_e_xhat + k * m2
      r_term = gamma * d_gamma / rstd
      c_xhat = -rstd * mean_g_xhat - r_term * rstd * rstd / count
      d_x = ((rstd * alpha) * e + (rstd * k) * dy +
             (x * (c_xhat * rstd) + (c_xhat * shift - rstd * mean_g)))
      return d_dy, d_x, d_gamma

    return (dx, dgamma, dbeta), grad

  return backward(dy, x, gamma)
