"""3x3 convolutions on small feature maps as matrix products.

On CPU, oneDNN's convolution kernels are slow on tiny feature maps with
many channels: a VGG-11 3x3 conv on 2x2x512 ran at ~1/4 of the FLOP rate
of the same network's 16x16 layers (`bench.profile_ops`). The same sum as
matmuls, which run such shapes near the machine's peak:
  - maps of at most `SMALL_MAX_PIXELS` pixels: per kernel tap, one matmul
    of the pixels it joins by its [C_in, C_out] block (no padding
    products, no copies of the kernel);
  - other even-sized maps in float32/float64: Winograd's F(2x2, 3x3)
    (`winograd.py`, 2.25x fewer multiplies);
  - otherwise "im2col": 9 shifted slices of the zero-padded input times
    the [9 * C_in, C_out] kernel.

Gradients of im2col and Winograd (hand-written, so that no slow "col2im"
appears on the FGR path):
  d x      = the same 3x3 convolution of dy with the kernel flipped in space
             and transposed (in <-> out channels), again as matmuls;
  d kernel = im2col(x)^T dy (Winograd: through its transforms' adjoints).
Both are differentiable TF ops (d x calls this function again), so second
derivatives are exact; the small-map form is plain matmuls, differentiated
by TF. Tests compare values, first and second derivatives with
`tf.nn.conv2d`.
"""

import keras
import tensorflow as tf

from fgr_tf import environment
from fgr_tf.backbones import winograd


def _im2col(x):
  """[B, H, W, C] -> [B * H * W, 9 * C]: zero-padded 3x3 neighbourhoods,
  ordered (row offset, column offset, channel) like a [3, 3, C, O] kernel."""
  height, width = x.shape[1], x.shape[2]
  padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
  patches = tf.concat([padded[:, i:i + height, j:j + width, :]
                       for i in range(3) for j in range(3)], axis=-1)
  return tf.reshape(patches, [-1, 9 * x.shape[3]])


# Maps of at most this many pixels take `_conv3x3_small`: a 2x2 map
# multiplies 4 * 4 = 16 (pixel, tap) blocks where im2col multiplies 4 * 9
# = 36 (20 of them padding); at 4x4 the two are level (144 blocks) and
# Winograd multiplies 64. Measured on VGG-11's 2x2x512 layer, batch 128
# (Xeon, AVX-512; forward / first / second order, ms, interleaved, with
# another job running): 7.2 / 17.2 / 39.5 against 12.6 / 29.9 / 80.7 for
# the previous form (one dense [4 C_in, 4 C_out] matrix gathered from the
# kernel: its gather, transposes and segment sums cost more than its
# products) and 46.9 / 82.3 / 230 for oneDNN's conv2d.
SMALL_MAX_PIXELS = 4


def _conv3x3_small(x, kernel):
  """`conv3x3_same` on a map of at most `SMALL_MAX_PIXELS` pixels: for each
  kernel tap, one matmul of the input pixels it reads (the (input, output)
  pixel pairs it joins, stacked on the batch axis) by that tap's
  [C_in, C_out] block; each output pixel sums its blocks. No padding
  products, no copies of the kernel; plain differentiable ops (unstack,
  concat, matmul, split, add), so TF's autodiff gives exact first and
  second derivatives (d x, d kernel: matmuls by the same blocks)."""
  height, width, in_channels = x.shape[1], x.shape[2], x.shape[3]
  out_channels = kernel.shape[3]
  pixels = tf.unstack(tf.reshape(x, [-1, height * width, in_channels]),
                      axis=1)                               # [B, C_in] each
  taps = tf.unstack(tf.reshape(kernel, [9, in_channels, out_channels]))
  parts = [[] for _ in pixels]  # per output pixel, its [B, C_out] products
  for tap, block in enumerate(taps):
    di, dj = divmod(tap, 3)
    pairs = [(i * width + j, (i + di - 1) * width + (j + dj - 1))
             for i in range(height) for j in range(width)
             if 0 <= i + di - 1 < height and 0 <= j + dj - 1 < width]
    if not pairs:
      continue
    products = tf.matmul(tf.concat([pixels[q] for _, q in pairs], axis=0),
                         block)
    for (p, _), product in zip(pairs, tf.split(products, len(pairs))):
      parts[p].append(product)
  y = tf.stack([tf.add_n(p) for p in parts], axis=1)
  return tf.reshape(y, [-1, height, width, out_channels])


def conv3x3_same(x, kernel, use_winograd=True):
  """`tf.nn.conv2d(x, kernel, 1, "SAME")` for a 3x3 kernel, via matmuls:
  on maps of at most `SMALL_MAX_PIXELS` pixels by tap blocks
  (`_conv3x3_small`); on other even-sized maps in float32 or float64 by
  Winograd's F(2x2, 3x3) (`winograd.py`) unless `use_winograd` is False;
  else by im2col.
  (In float16 / bfloat16 Winograd's transforms would add roundings that
  the direct sum, accumulated in float32 by the matmul, does not.)

  Args:
    x: [B, H, W, C_in] with static H, W, C_in.
    kernel: [3, 3, C_in, C_out], same dtype.
    use_winograd: allow the Winograd form.

  Returns:
    [B, H, W, C_out].
  """
  height, width = x.shape[1], x.shape[2]
  if (use_winograd and height * width > SMALL_MAX_PIXELS and
      winograd.applies(height, width) and
      x.dtype in (tf.float32, tf.float64)):
    return winograd.conv3x3_same(x, kernel)
  return _conv3x3_matmul(x, kernel)


def _conv3x3_matmul(x, kernel):
  """`conv3x3_same` by tap blocks (small maps) or im2col."""
  if x.shape[1] * x.shape[2] <= SMALL_MAX_PIXELS:
    return _conv3x3_small(x, kernel)
  return _conv3x3_im2col(x, kernel)


@tf.custom_gradient
def _conv3x3_im2col(x, kernel):
  """`conv3x3_same` by im2col."""
  height, width = x.shape[1], x.shape[2]
  out_channels = kernel.shape[3]
  cols = _im2col(x)
  y = tf.reshape(tf.matmul(cols, tf.reshape(kernel, [-1, out_channels])),
                 [-1, height, width, out_channels])

  def grad(dy):
    dx = _conv3x3_im2col(dy, winograd.flip_and_transpose(kernel))
    kernel_gradient = tf.reshape(
        tf.matmul(cols, tf.reshape(dy, [-1, out_channels]),
                  transpose_a=True), tf.shape(kernel))
    return dx, kernel_gradient

  return y, grad


def applies(inputs_shape, kernel_size, strides, padding, dilation_rate,
            groups, data_format, max_pixels):
  """Whether a Conv2D call can and should take `conv3x3_same`."""
  if len(inputs_shape) != 4 or None in tuple(inputs_shape[1:]):
    return False
  return (tuple(kernel_size) == (3, 3) and tuple(strides) == (1, 1) and
          padding == "same" and tuple(dilation_rate) == (1, 1) and
          groups == 1 and data_format == "channels_last" and
          inputs_shape[1] * inputs_shape[2] <= max_pixels)


@keras.saving.register_keras_serializable(package="fgr_tf")
class Conv2D(keras.layers.Conv2D):
  """`keras.layers.Conv2D` that runs 3x3 stride-1 "same" convolutions on
  feature maps of at most `GEMM_MAX_PIXELS` pixels (static H * W) as
  `conv3x3_same`; every other call is Keras's. Same weights and config."""

  # Measured (`python -m bench.conv`, Xeon, FGR's second-order step, ms,
  # commit 17f21c0, docs/PERFORMANCE.md): with AVX-512 the matmul forms
  # take 31 (tap blocks) against oneDNN's 152 at 2x2x512, 102 / 55
  # (Winograd) against 215 / 107 at 4x4x512 / 4x4x256->512; with
  # ONEDNN_MAX_CPU_ISA=AVX2 42 vs 169 at 2x2, 161 / 87 vs 280 / 144 at
  # 4x4. At 8x8 neither wins on both ISAs and both channel counts
  # (Winograd 133 vs 144 AVX-512, 203 vs 225 AVX2 at 256 channels; 81 vs
  # 73 and 124 vs 112 at 128), so oneDNN keeps them (in training; the
  # attacks' loops: XLA_WINOGRAD_MAX_PIXELS). Force either path with the
  # environment variable FGR_TF_GEMM_MAX_PIXELS (0 = always oneDNN's
  # kernels; in the attacks with FGR_TF_XLA_WINOGRAD_MAX_PIXELS=0 too) or
  # by setting this attribute before the model is traced.
  GEMM_MAX_PIXELS = environment.pixels("FGR_TF_GEMM_MAX_PIXELS", 16)
  # Whether even-sized maps above SMALL_MAX_PIXELS take the Winograd form
  # (else im2col); FGR_TF_WINOGRAD=0 turns it off.
  WINOGRAD = environment.switch("FGR_TF_WINOGRAD")
  # In the attacks' loops (`prepared_convolution_op`), even-sized maps of
  # more than SMALL_MAX_PIXELS and at most this many pixels (VGG-11's 4x4
  # and 8x8 layers) take Winograd with its transforms by XLA
  # (`winograd.prepared_by_xla`), on CPUs, when the loop's batch size is
  # fixed; FGR_TF_XLA_WINOGRAD_MAX_PIXELS=0 keeps the matrix transforms at
  # 4x4 and oneDNN's kernels at 8x8 there. At 4x4 the XLA transforms are
  # faster than the matrix form on both ISAs: VGG-11's 4x4x256 -> 512 /
  # 4x4x512 -> 512 layers (batch 128, forward + input gradient) 27.7 /
  # 52.3 against 30.7 / 59.4 ms on an AMD EPYC (AVX-512); the 10-step flow
  # attack, paired, 1.030x / 1.064x faster there with AVX-512 / AVX2
  # kernels, 1.010x / 1.022x on a Xeon (docs/PERFORMANCE.md).
  XLA_WINOGRAD_MAX_PIXELS = environment.pixels(
      "FGR_TF_XLA_WINOGRAD_MAX_PIXELS", winograd.XLA_MAX_PIXELS)

  def convolution_op(self, inputs, kernel):
    if applies(inputs.shape, self.kernel_size, self.strides, self.padding,
               self.dilation_rate, self.groups, self.data_format,
               self.GEMM_MAX_PIXELS):
      return conv3x3_same(inputs, tf.convert_to_tensor(kernel),
                          self.WINOGRAD)
    return super().convolution_op(inputs, kernel)

  def prepared_convolution_op(self, kernel, inputs_shape, xla=True):
    """inputs -> `convolution_op(inputs, kernel)`, with the work that
    depends on the kernel alone (Winograd's kernel transforms) done now,
    for inputs of `inputs_shape` (other shapes: `convolution_op`).
    `xla`: whether maps up to XLA_WINOGRAD_MAX_PIXELS may take Winograd
    with XLA transforms (False where the batch size changes from call to
    call, e.g. attacks on shrinking active sets: XLA compiles once per
    shape)."""
    kernel = tf.convert_to_tensor(kernel)
    inputs_shape = tf.TensorShape(inputs_shape)
    unprepared = lambda inputs: self.convolution_op(inputs, kernel)
    if not (self.WINOGRAD and inputs_shape.rank == 4 and
            kernel.dtype in (tf.float32, tf.float64) and
            applies(inputs_shape, self.kernel_size, self.strides,
                    self.padding, self.dilation_rate, self.groups,
                    self.data_format,
                    max(self.GEMM_MAX_PIXELS,
                        self.XLA_WINOGRAD_MAX_PIXELS if xla else 0))
            and inputs_shape[1] % 2 == 0 and inputs_shape[2] % 2 == 0):
      return unprepared
    pixels = inputs_shape[1] * inputs_shape[2]
    if pixels <= SMALL_MAX_PIXELS:
      return unprepared  # tap blocks: nothing to prepare
    if (xla and pixels <= self.XLA_WINOGRAD_MAX_PIXELS and
        not tf.config.list_logical_devices("GPU")):
      conv = winograd.prepared_by_xla(kernel)
    elif pixels <= self.GEMM_MAX_PIXELS and winograd.applies(
        inputs_shape[1], inputs_shape[2]):
      conv = winograd.prepared(kernel)
    else:
      return unprepared

    def call(inputs):
      if inputs.shape[1:] != inputs_shape[1:] or inputs.dtype != kernel.dtype:
        return self.convolution_op(inputs, kernel)
      return conv(inputs)

    return call
