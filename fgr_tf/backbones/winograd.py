"""3x3 "same" convolutions on even-sized maps by Winograd's F(2x2, 3x3).

Each 2x2 block of outputs is computed from its 4x4 input tile as
  y = A^T [(G g G^T) * (B^T d B)] A        (Lavin & Gray, 2016)
where, summed over input channels, the elementwise product becomes 16
matrix products [tiles, C_in] x [C_in, C_out]: 16 multiplies per 2x2
outputs instead of 36, i.e. 2.25x fewer FLOPs than the direct sum. The
transforms are additions (and halvings of the kernel, exact in binary), so
the float32 error is that of the direct sum (tests/test_gemm_conv.py).

The input and output transforms of all tiles are one matmul each with a
constant [16 T, H W] / [H W, 16 T] matrix (T = H/2 * W/2 tiles) on the
pixel-major map ([H W, B C]: the transposes touch the map, not the 4x
larger tile domain); the matrices grow with the map's square, so the
form is for small maps (`MAX_PIXELS`). Measured (`python -m bench.conv`,
Xeon, batch 128, forward / first / second order, ms), VGG-11's
4x4x512->512 layer: 17.4 / 38.9 / 92 against im2col's 31.0 / 66.9 / 158
and oneDNN's 42.7 / 84.1 / 209 with AVX-512; 27.6 / 60.1 / 149 against
51.3 / 110 / 257 and 52.7 / 114 / 280 with ONEDNN_MAX_CPU_ISA=AVX2. At
8x8 it is level with oneDNN (256 channels) or slower (128), so
`gemm_conv.Conv2D` keeps oneDNN there.
Written with slices instead, the 4x4x512 input transform took 3x (even /
odd rows by reshaping) to 20x (strided slices, a per-element loop in TF on
CPU) as long as the matrix form (14.5 / 98 against 4.8 ms, batch 128,
measured while another job shared the cores).

Gradients are hand-written, like the matmul form's:
  d x      = the same convolution of dy with the kernel flipped in space
             and transposed (in <-> out channels), again by Winograd;
  d kernel = G^T [sum over tiles of (B^T d B)^T (A dy A^T)] G,
both from differentiable ops, so second derivatives are exact.
"""

import functools

import numpy as np
import tensorflow as tf

from fgr_tf.backbones import pooling

_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])
# [16, 9]: the kernel transform g -> G g G^T on flattened 3x3 / 4x4 taps.
_KERNEL_TRANSFORM = np.einsum("ai,bj->abij", _G, _G).reshape(16, 9)


# Rows: B^T (input tile -> transformed tile), A^T (transformed -> outputs).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


@functools.lru_cache(maxsize=None)
def _input_matrix(height, width):
  """[16 * T, H * W] float64, T = H/2 * W/2 tiles: row (xi, nu, tile) holds
  the weights of B^T d B at (xi, nu) of that tile's zero-padded 4x4 input
  window (rows 2 t - 1 ... 2 t + 2), on the map's pixels."""
  tiles_h, tiles_w = height // 2, width // 2
  matrix = np.zeros((4, 4, tiles_h, tiles_w, height, width))
  for t in range(tiles_h):
    for u in range(tiles_w):
      for i in range(4):
        for j in range(4):
          row, col = 2 * t + i - 1, 2 * u + j - 1
          if 0 <= row < height and 0 <= col < width:
            matrix[:, :, t, u, row, col] += np.outer(_BT[:, i], _BT[:, j])
  return matrix.reshape(16 * tiles_h * tiles_w, height * width)


@functools.lru_cache(maxsize=None)
def _output_matrix(height, width):
  """[H * W, 16 * T] float64: A^T m A of each tile, placed at its 2x2
  output block."""
  tiles_h, tiles_w = height // 2, width // 2
  matrix = np.zeros((height, width, 4, 4, tiles_h, tiles_w))
  for t in range(tiles_h):
    for u in range(tiles_w):
      for a in range(2):
        for b in range(2):
          matrix[2 * t + a, 2 * u + b, :, :, t, u] = np.outer(_AT[a], _AT[b])
  return matrix.reshape(height * width, 16 * tiles_h * tiles_w)


def _pixel_major(t):
  """[B, H, W, C] -> [H * W, B * C]."""
  pixels = t.shape[1] * t.shape[2]
  t = tf.transpose(tf.reshape(t, [-1, pixels, t.shape[3]]), [1, 0, 2])
  return tf.reshape(t, [pixels, -1])


def _input_transform(x):
  """[B, H, W, C] -> [16, T * B, C]: B^T d B of every tile (rows ordered
  tile-major, then image)."""
  matrix = tf.constant(_input_matrix(x.shape[1], x.shape[2]), x.dtype)
  return tf.reshape(tf.matmul(matrix, _pixel_major(x)), [16, -1, x.shape[3]])


def _output_transform(m, batch, height, width):
  """[16, T * B, C] -> [B, H, W, C]: A^T m A of every tile."""
  channels = m.shape[-1]
  y = tf.matmul(tf.constant(_output_matrix(height, width), m.dtype),
                tf.reshape(m, [16 * (height // 2) * (width // 2), -1]))
  y = tf.transpose(tf.reshape(y, [height * width, batch, channels]),
                   [1, 0, 2])
  return tf.reshape(y, [batch, height, width, channels])


def _output_adjoint(dy):
  """[B, H, W, C] -> [16, T * B, C]: A dy A^T per tile, the adjoint of
  `_output_transform`."""
  matrix = tf.constant(_output_matrix(dy.shape[1], dy.shape[2]), dy.dtype)
  tiles = tf.matmul(matrix, _pixel_major(dy), transpose_a=True)
  return tf.reshape(tiles, [16, -1, dy.shape[3]])


def _kernel_transform(kernel):
  """[3, 3, C_in, C_out] -> [16, C_in, C_out]: G g G^T."""
  u = tf.matmul(tf.constant(_KERNEL_TRANSFORM, kernel.dtype),
                tf.reshape(kernel, [9, -1]))
  return tf.reshape(u, [16, kernel.shape[2], kernel.shape[3]])


def _kernel_adjoint(du, in_channels, out_channels):
  """[16, C_in, C_out] -> [3, 3, C_in, C_out]: G^T du G."""
  g = tf.matmul(tf.constant(_KERNEL_TRANSFORM, du.dtype),
                tf.reshape(du, [16, -1]), transpose_a=True)
  return tf.reshape(g, [3, 3, in_channels, out_channels])


def flip_and_transpose(kernel):
  """[3, 3, C_in, C_out] -> [3, 3, C_out, C_in], spatially reversed."""
  return tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])


# Largest map (H * W) the form takes; see the module docstring.
MAX_PIXELS = 64


def applies(height, width):
  """Whether F(2x2, 3x3) tiles an H x W map exactly and the map is small
  enough for the matrix transforms."""
  return height % 2 == 0 and width % 2 == 0 and height * width <= MAX_PIXELS


@tf.custom_gradient
def conv3x3_same(x, kernel):
  """`tf.nn.conv2d(x, kernel, 1, "SAME")` for a 3x3 kernel by Winograd.

  Args:
    x: [B, H, W, C_in], static H, W (even) and C_in.
    kernel: [3, 3, C_in, C_out], same dtype.

  Returns:
    [B, H, W, C_out].
  """
  height, width = x.shape[1], x.shape[2]
  in_channels, out_channels = kernel.shape[2], kernel.shape[3]
  tiles = _input_transform(x)
  y = _output_transform(tf.matmul(tiles, _kernel_transform(kernel)),
                        tf.shape(x)[0], height, width)

  def grad(dy):
    dx = conv3x3_same(dy, flip_and_transpose(kernel))
    du = tf.matmul(tiles, _output_adjoint(dy), transpose_a=True)
    return dx, _kernel_adjoint(du, in_channels, out_channels)

  return y, grad


def prepared(kernel):
  """x -> `conv3x3_same(x, kernel)` with the kernel's transforms (for the
  convolution and for its input gradient's flipped kernel) computed now,
  once: for loops that apply one kernel many times (the attacks), where
  they would otherwise be recomputed at every iteration (4.5 ms per
  iteration for VGG-11's 4x4x512 layer on a Xeon, ~3% of a flow-PGD
  step). Same values and derivatives.

  Args:
    kernel: [3, 3, C_in, C_out].

  Returns:
    A callable on [B, H, W, C_in] (H, W even, static).
  """
  flipped = flip_and_transpose(kernel)
  transformed = (_kernel_transform(kernel), _kernel_transform(flipped))
  return lambda x: _conv_transformed(x, kernel, flipped, *transformed)


@tf.custom_gradient
def _conv_transformed(x, kernel, flipped, u, u_flipped):
  """`conv3x3_same(x, kernel)` given u = G kernel G^T and u_flipped, that of
  `flipped` = flip_and_transpose(kernel). The kernel's gradient goes to
  `kernel` (and to `flipped` in the input gradient's own gradient), none
  to the transforms, which are functions of them."""
  height, width = x.shape[1], x.shape[2]
  in_channels, out_channels = kernel.shape[2], kernel.shape[3]
  tiles = _input_transform(x)
  y = _output_transform(tf.matmul(tiles, u), tf.shape(x)[0], height, width)

  def grad(dy):
    dx = _conv_transformed(dy, flipped, kernel, u_flipped, u)
    du = tf.matmul(tiles, _output_adjoint(dy), transpose_a=True)
    return (dx, _kernel_adjoint(du, in_channels, out_channels), None, None,
            None)

  return y, grad


# The attacks' 4x4 and 8x8 maps (`gemm_conv.Conv2D.prepared_convolution_op`,
# for their loops at a fixed batch size): the input and output transforms
# as XLA computations, slices and additions fused into one pass each (the
# matrix form's transforms grow with the map's square, and even at 4x4
# its transposes and matmuls are extra passes). Measured (scratch
# microbenchmark, Xeon, batch 128, forward and input gradient with bias
# and ReLU, ms): VGG-11's 8x8x256 -> 256 layer 39 against oneDNN's 54
# with AVX-512, 55 against 82 with ONEDNN_MAX_CPU_ISA=AVX2; 8x8x128 ->
# 256 23.4 against 26.7, 33 against 42.5. At 16x16 (64 -> 128) it was
# slower (24 against 15 ms forward). At 4x4 (AMD EPYC, AVX-512, with a
# ReLU): 4x4x256 -> 512 27.7 against the matrix form's 30.7, 4x4x512 ->
# 512 52.3 against 59.4.
XLA_MAX_PIXELS = 64


def _tile_rows(x, axis):
  """x with 2 T entries along `axis` -> the 4 tensors of entries 2 t - 1 + i,
  i = 0..3, t < T (each tile's 4 rows or columns of the map zero-padded
  by one on both sides). The padding enters only the first and last
  tiles' outer rows: no padded copy of the map (XLA made one, a pass of
  its own: 0.6-0.9 of the 8x8x256 transform's ~4.1 ms)."""
  count = x.shape[axis] // 2
  shape = [-1] + x.shape.as_list()[1:]
  shape[axis:axis + 1] = [count, 2]
  pairs = tf.reshape(x, shape)  # entries 2 t + (0, 1) as [..., T, 2, ...]
  even, odd = (tf.gather(pairs, i, axis=axis + 1) for i in (0, 1))

  def shifted(t, start, padding):  # t's entries start .. start + T - 2,
    index = [slice(None)] * x.shape.rank  # zero-padded back to T
    index[axis] = slice(start, start + count - 1)
    paddings = [[0, 0]] * x.shape.rank
    paddings[axis] = padding
    return tf.pad(t[tuple(index)], paddings)

  return [shifted(odd, 0, [1, 0]), even, odd, shifted(even, 1, [0, 1])]


def _bt(d):
  """B^T applied to 4 rows (or columns) d."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


@tf.function(jit_compile=True)
def _input_transform_by_xla(x):
  """[B, H, W, C] -> 16 tensors [B * T, C]: (B^T d B)[xi, nu] of every
  tile (image-major), list index 4 xi + nu."""
  channels = x.shape[3]
  out = []
  for rows in _bt(_tile_rows(x, 1)):
    out.extend(tf.reshape(t, [-1, channels])
               for t in _bt(_tile_rows(rows, 2)))
  return out


@tf.function(jit_compile=True)
def _output_transform_by_xla(products, height, width):
  """16 tensors [B * T, C] (index 4 xi + nu) -> [B, H, W, C]: A^T m A of
  every tile."""
  channels = products[0].shape[-1]
  m = [[tf.reshape(products[4 * i + j], [-1, height // 2, width // 2,
                                         channels]) for j in range(4)]
       for i in range(4)]
  rows = [[m[0][j] + m[1][j] + m[2][j] for j in range(4)],
          [m[1][j] - m[2][j] - m[3][j] for j in range(4)]]
  y = tf.stack([tf.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], axis=3)
                for r in rows], axis=2)  # [B, T_h, 2, T_w, 2, C]
  return tf.reshape(y, [-1, height, width, channels])


def _transformed_by_xla(x, u):
  """`tf.nn.conv2d(x, kernel, 1, "SAME")` given u = G kernel G^T."""
  tiles = _input_transform_by_xla(x)
  products = [tf.matmul(t, w) for t, w in zip(tiles, tf.unstack(u))]
  return _output_transform_by_xla(products, x.shape[1], x.shape[2])


def prepared_by_xla(kernel):
  """`prepared`, the transforms of the maps by XLA (`XLA_MAX_PIXELS`): for
  the attacks' loops. Under pfor (ADef's jacobian, which cannot vectorize
  XLA calls) the input gradient is TF's. Same values and derivatives as
  `tf.nn.conv2d` (second order included; the kernel's gradient is TF's
  `conv2d_backprop_filter`)."""
  flipped = flip_and_transpose(kernel)
  transformed = (_kernel_transform(kernel), _kernel_transform(flipped))
  return lambda x: _conv_by_xla(x, kernel, flipped, *transformed)


@tf.custom_gradient
def _conv_by_xla(x, kernel, flipped, u, u_flipped):
  """`_conv_transformed` by `_transformed_by_xla`."""
  y = _transformed_by_xla(x, u)

  def grad(dy):
    if pooling.in_pfor():
      dx = tf.nn.conv2d_transpose(dy, kernel, tf.shape(x), 1, "SAME")
    else:
      dx = _conv_by_xla(dy, flipped, kernel, u_flipped, u)
    d_kernel = tf.compat.v1.nn.conv2d_backprop_filter(
        x, tf.shape(kernel), dy, [1, 1, 1, 1], "SAME")
    return dx, d_kernel, None, None, None

  return y, grad
