"""Layer factories shared by the backbones (PyTorch-matching defaults)."""

import keras

from fgr_tf import errors
from fgr_tf.backbones import batch_norm
from fgr_tf.backbones import gemm_conv
from fgr_tf.backbones import pooling

# PyTorch's BatchNorm2d: eps 1e-5, running = 0.9 running + 0.1 batch.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class LayerFactory:
  """Makes layers with one dtype, weight decay and BatchNorm flavour.

  Args:
    dtype: layer dtype or policy name ("float32", "float64",
      "mixed_float16", ...); None uses the global policy.
    weight_decay: PyTorch-style (coupled) weight decay: every kernel, bias,
      gamma and beta gets an L2 loss `weight_decay / 2 * ||w||^2`, whose
      gradient `weight_decay * w` is what torch.optim.SGD(weight_decay=...)
      adds.
    sync_batchnorm: synchronize BatchNorm statistics across replicas
      under tf.distribute (`keras.layers.BatchNormalization(synchronized=True)`).
  """

  def __init__(self, dtype=None, weight_decay=0.0, sync_batchnorm=False):
    if weight_decay < 0:
      raise errors.UserError(
          f"weight_decay must be >= 0. Received: weight_decay={weight_decay}")
    self.dtype = dtype
    self.sync_batchnorm = sync_batchnorm
    self.l2 = (keras.regularizers.L2(weight_decay / 2)
               if weight_decay > 0 else None)

  def conv(self, filters, name, strides=1, kernel_size=3, use_bias=True):
    return gemm_conv.Conv2D(
        filters, kernel_size, strides=strides, padding="same",
        use_bias=use_bias, kernel_regularizer=self.l2,
        bias_regularizer=self.l2 if use_bias else None, dtype=self.dtype,
        name=name)

  def batch_norm(self, name):
    return batch_norm.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        synchronized=self.sync_batchnorm, gamma_regularizer=self.l2,
        beta_regularizer=self.l2, dtype=self.dtype, name=name)

  def dense(self, units, name, activation=None):
    return keras.layers.Dense(
        units, activation=activation, kernel_regularizer=self.l2,
        bias_regularizer=self.l2, dtype=self.dtype, name=name)

  def relu(self, name=None):
    return keras.layers.ReLU(dtype=self.dtype, name=name)

  def max_pool(self, name=None):
    return pooling.MaxPooling2D(2, 2, dtype=self.dtype, name=name)
