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

Speed: for float32 NHWC inputs (the common case) the layer runs TF's fused
kernel (`FusedBatchNormV3`, oneDNN on CPU, cuDNN on GPU), whose registered
gradient `FusedBatchNormGradV3` is fused too. Its own gradient (TF's
`_FusedBatchNormGradGrad`) recomputes the batch statistics from x without
a stop_gradient on the mean where it matters, so second derivatives stay
exact (tested against this module's unfused float64 path and finite
differences). Other dtypes, masks, synchronized and renormalized statistics
take the unfused path.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="fgr_tf")
class BatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with exact second derivatives.

  Same arguments, weights and behaviour; in training mode the batch mean and
  (biased) variance are computed without `stop_gradient`, and the moving
  statistics are updated with the biased variance, as Keras does.
  Synchronized and masked statistics use Keras's own code, which has no
  `stop_gradient` (synchronized: E[x^2] - E[x]^2 over all replicas).
  """

  def _can_fuse(self, inputs, training, mask):
    return (mask is None and not self.synchronized and not self.renorm and
            self.scale and self.center and len(inputs.shape) == 4 and
            self.axis in (-1, 3) and
            keras.backend.result_type(inputs.dtype, "float32") == "float32")

  def call(self, inputs, training=None, mask=None):
    if not self._can_fuse(inputs, training, mask):
      return super().call(inputs, training=training, mask=mask)
    inputs = tf.cast(inputs, tf.float32)
    is_training = bool(training and self.trainable)
    empty = tf.zeros([0], tf.float32)
    outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=tf.cast(self.gamma, tf.float32),
        offset=tf.cast(self.beta, tf.float32),
        mean=empty if is_training else tf.cast(self.moving_mean, tf.float32),
        variance=(empty if is_training else
                  tf.cast(self.moving_variance, tf.float32)),
        epsilon=self.epsilon, is_training=is_training, data_format="NHWC")
    if is_training:
      # The kernel returns the unbiased variance; Keras's moving average
      # (and the unfused path) uses the biased one.
      count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
      variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
      for moving, batch in ((self.moving_mean, mean),
                            (self.moving_variance, variance)):
        moving.assign(tf.cast(moving, tf.float32) * self.momentum +
                      tf.stop_gradient(batch) * (1.0 - self.momentum))
    return tf.cast(outputs, self.compute_dtype)

  def _moments(self, inputs, mask):
    if mask is not None or self.synchronized:
      return super()._moments(inputs, mask)
    mean = tf.reduce_mean(inputs, axis=self._reduction_axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(inputs - mean),
                              axis=self._reduction_axes, keepdims=True)
    return (tf.squeeze(mean, self._reduction_axes),
            tf.squeeze(variance, self._reduction_axes))
