"""A first convolution's input gradient (few input channels) by a matmul.

The attacks differentiate w.r.t. the image, so through the first layer's
input gradient: a 3x3 convolution's backward pass to an input of 1-3
channels (the image's), on which oneDNN's kernel is slow (its output has
too few channels to fill a vector). Computed instead as one matmul of dy
[B H W, C_out] by the kernel's taps [C_out, 9 C_in], then the sum of the
nine products shifted to the pixels they came from (one XLA computation;
as TF ops it took 4.5 ms). Measured alone (a scratch microbenchmark;
Xeon, AVX-512): the quickstart CNN's first layer (28x28, 32 <- 1, batch
250) 2.6 against oneDNN's 6.4 ms, VGG-11's (32x32, 64 <- 3, batch 128)
5.5 against 9.0 ms; padding the input channels to 4, 8 or 16 made
oneDNN slower. Same sums in another order (float32 round-off).

`folding.prepared_inference_function` (the attacks' loops) runs such
layers through `conv_with_bias`. Under pfor (ADef's jacobian on colour
images, which cannot vectorize an XLA call; on gray images ADef stops the
jacobian before the first block: `first_block`) and on batches that
change size (XLA would
compile once per size) the nine shifted sums are instead one 3x3
convolution of the products with a constant 0/1 kernel
(`input_gradient_by_ops`): under pfor, 9 x 90 gradients of the quickstart
CNN's first layer took 14.4 against 23.0 ms by oneDNN's transposed
convolution (VGG-11's, 64 <- 3: 37 against 42 ms). With GPUs present the
gradient is TF's own. FGR_TF_FIRST_LAYER_GRADIENT=native turns it off.
"""

import keras
import numpy as np
import tensorflow as tf

from fgr_tf import environment
from fgr_tf.backbones import gemm_conv
from fgr_tf.backbones import pooling

MAX_INPUT_CHANNELS = 4
GRADIENT = environment.choice("FGR_TF_FIRST_LAYER_GRADIENT", "matmul",
                              ("matmul", "native"))


def applies(conv, inputs_shape, dtype):
  """Whether Keras Conv2D `conv`, on inputs of `inputs_shape` in `dtype`,
  takes `conv_with_bias`."""
  inputs_shape = tf.TensorShape(inputs_shape)
  return (GRADIENT == "matmul" and isinstance(conv, keras.layers.Conv2D) and
          inputs_shape.rank == 4 and
          # 3x3, stride 1, "same", static H, W, C: the matmul forms' test.
          gemm_conv.applies(inputs_shape, conv.kernel_size, conv.strides,
                            conv.padding, conv.dilation_rate, conv.groups,
                            conv.data_format, max_pixels=float("inf")) and
          inputs_shape[3] <= MAX_INPUT_CHANNELS and
          tf.as_dtype(dtype) in (tf.float32, tf.float64) and
          not tf.config.list_logical_devices("GPU"))


def sum_shifted_taps(products):
  """[B, H, W, 3, 3, C] -> [B, H, W, C]: out[q] = sum over taps t of
  products[q - t + 1, t] (zero outside the map)."""
  height, width = products.shape[1], products.shape[2]
  padded = tf.pad(products, [[0, 0], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0]])
  out = None
  for i in range(3):
    for j in range(3):
      part = padded[:, 2 - i:2 - i + height, 2 - j:2 - j + width, i, j, :]
      out = part if out is None else out + part
  return out


_sum_shifted_taps = tf.function(sum_shifted_taps, jit_compile=True)


def _tap_products(dy, kernel):
  """[B, H, W, 9 C_in] products of dy [B, H, W, C_out] (static H, W) by
  the kernel's taps [C_out, 9 C_in], channel (i, j, c): one matmul."""
  height, width = dy.shape[1], dy.shape[2]
  in_channels, out_channels = kernel.shape[2], kernel.shape[3]
  taps = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]),
                    [out_channels, 9 * in_channels])
  return tf.reshape(tf.matmul(tf.reshape(dy, [-1, out_channels]), taps),
                    [-1, height, width, 9 * in_channels])


def input_gradient(dy, kernel):
  """d/d x of `tf.nn.conv2d(x, kernel, 1, "SAME")` given dy [B, H, W,
  C_out] (static H, W), kernel [3, 3, C_in, C_out]: [B, H, W, C_in]."""
  return _sum_shifted_taps(tf.reshape(
      _tap_products(dy, kernel),
      [-1, dy.shape[1], dy.shape[2], 3, 3, kernel.shape[2]]))


def input_gradient_by_ops(dy, kernel):
  """`input_gradient` without XLA (pfor vectorizes it; any batch size):
  the matmul, then the nine shifted sums as one "SAME" 3x3 convolution of
  the [B, H, W, 9 C_in] products with a constant 0/1 kernel that takes
  tap (i, j) of channel c from pixel q - (i - 1, j - 1)."""
  in_channels = kernel.shape[2]
  shifts = np.zeros((3, 3, 9 * in_channels, in_channels))
  for i in range(3):
    for j in range(3):
      for c in range(in_channels):
        shifts[2 - i, 2 - j, (3 * i + j) * in_channels + c, c] = 1
  return tf.nn.conv2d(_tap_products(dy, kernel),
                      tf.constant(shifts, dy.dtype), 1, "SAME")


def conv_with_bias(kernel, bias, xla=True):
  """inputs -> `tf.nn.bias_add(tf.nn.conv2d(inputs, kernel, 1, "SAME"),
  bias)` (one fused oneDNN op), whose gradient w.r.t. the inputs is
  `input_gradient` (`input_gradient_by_ops` under pfor, and with `xla`
  False: for batches that change size); kernel and bias gradients are
  TF's."""

  @tf.custom_gradient
  def call(inputs, kernel, bias):
    outputs = tf.nn.bias_add(tf.nn.conv2d(inputs, kernel, 1, "SAME"), bias)

    def grad(dy):
      if pooling.in_pfor() or not xla:
        d_inputs = input_gradient_by_ops(dy, kernel)
      else:
        d_inputs = input_gradient(dy, kernel)
      d_kernel = tf.compat.v1.nn.conv2d_backprop_filter(
          inputs, tf.shape(kernel), dy, [1, 1, 1, 1], "SAME")
      return d_inputs, d_kernel, tf.reduce_sum(dy, axis=[0, 1, 2])

    return outputs, grad

  return lambda inputs: call(inputs, kernel, bias)
