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
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="fgr_tf")
class BatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with exact second derivatives.

  Same arguments, weights and behaviour; in training mode the batch mean and
  (biased) variance are computed without `stop_gradient`. Synchronized and
  masked statistics use Keras's own code, which has no `stop_gradient`
  (synchronized: E[x^2] - E[x]^2 over all replicas).
  """

  def _moments(self, inputs, mask):
    if mask is not None or self.synchronized:
      return super()._moments(inputs, mask)
    mean = tf.reduce_mean(inputs, axis=self._reduction_axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(inputs - mean),
                              axis=self._reduction_axes, keepdims=True)
    return (tf.squeeze(mean, self._reduction_axes),
            tf.squeeze(variance, self._reduction_axes))
