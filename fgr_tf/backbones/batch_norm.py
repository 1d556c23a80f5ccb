"""BatchNormalization whose batch statistics are twice differentiable.

FGR differentiates the input gradient w.r.t. the weights, so every layer
must have correct SECOND derivatives. Keras's BatchNormalization (TF backend)
computes the batch variance with `tf.nn.moments`, i.e.
`mean((x - stop_gradient(mean))^2)`. The first derivative is still exact
(the gradient of the variance w.r.t. the mean is identically zero), but the
backward graph then treats the mean as a constant, so derivatives OF the
gradient are wrong: measured on the original's golden VGG, the parameter
gradients of `ce + 300 * FGR` were off by up to 46% of their largest entry
(tests/golden_report.py; tests/test_models.py checks against finite
differences).

Speed and accuracy: for float32 NHWC inputs (the common case) the layer
runs `train_batch_norm`: two-pass statistics and hand-written first and
second derivatives in plain TF ops, the same numbers on CPU, GPU and XLA
(TF's FusedBatchNormV3 is not exact under XLA, which computes its variance
as E[x^2] - E[x]^2). Other dtypes, masks, synchronized and renormalized
statistics take the unfused path below.
"""

import keras
import tensorflow as tf

from fgr_tf.backbones import train_batch_norm


@keras.saving.register_keras_serializable(package="fgr_tf")
class BatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with exact second derivatives.

  Same arguments, weights and behaviour; in training mode the batch mean and
  (biased) variance are computed without `stop_gradient`, in two passes
  (mean, then the mean squared deviation; over all replicas when
  synchronized), and the moving statistics are updated with the biased
  variance, as Keras does. Masked statistics use Keras's own code.
  """

  def _fast_path(self, inputs, mask=None):
    return (mask is None and not self.synchronized and not self.renorm and
            self.scale and self.center and len(inputs.shape) == 4 and
            self.axis in (-1, 3) and
            keras.backend.result_type(inputs.dtype, "float32") == "float32")

  def call(self, inputs, training=None, mask=None):
    if not self._fast_path(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    inputs = tf.cast(inputs, tf.float32)
    gamma = tf.cast(self.gamma, tf.float32)
    beta = tf.cast(self.beta, tf.float32)
    if not (training and self.trainable):
      outputs = tf.raw_ops.FusedBatchNormV3(
          x=inputs, scale=gamma, offset=beta,
          mean=tf.cast(self.moving_mean, tf.float32),
          variance=tf.cast(self.moving_variance, tf.float32),
          epsilon=self.epsilon, is_training=False, data_format="NHWC")[0]
      return tf.cast(outputs, self.compute_dtype)
    outputs, mean, variance = train_batch_norm.train_batch_norm(
        inputs, gamma, beta, self.epsilon)
    for moving, batch in ((self.moving_mean, mean),
                          (self.moving_variance, variance)):
      moving.assign(tf.cast(moving, tf.float32) * self.momentum +
                    batch * (1.0 - self.momentum))
    return tf.cast(outputs, self.compute_dtype)

  def _moments(self, inputs, mask):
    if mask is not None:
      return super()._moments(inputs, mask)
    axes = self._reduction_axes
    ctx = tf.distribute.get_replica_context()
    if self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1:
      # Two passes over all replicas: Keras's synchronized moments compute
      # E[x^2] - E[x]^2, which cancels when |mean| >> std.
      def global_sum(value):
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(
            value, axis=axes, keepdims=True))
      count = global_sum(tf.ones_like(inputs))
      mean = global_sum(inputs) / count
      variance = global_sum(tf.square(inputs - mean)) / count
    else:
      mean = tf.reduce_mean(inputs, axis=axes, keepdims=True)
      variance = tf.reduce_mean(tf.square(inputs - mean), axis=axes,
                                keepdims=True)
    return tf.squeeze(mean, axes), tf.squeeze(variance, axes)
