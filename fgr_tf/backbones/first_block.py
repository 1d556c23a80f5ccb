"""The input gradients of a model's first block for many cotangents at once.

ADef needs, at every iteration, the gradient of k candidate logit
differences w.r.t. the image: k backward passes. `tape.jacobian` runs them
as one batch under pfor, which cannot vectorize XLA computations and tiles
every per-image tensor of the backward pass over the k candidates. In the
first block (conv with its BatchNorm folded, then max pool and ReLU, at
full resolution) that is memory traffic, not arithmetic: on the
quickstart CNN the first block's part of the candidates' backward passes
(the tiled pool mask and its products, the first layer's tap products
and shifted sums, the warp's gradient) took ~290 of ADef's 833 ms of op
time per batch of 250.

`record()` captures the first block of a prepared inference function
(`folding.prepared_inference_function`) as it runs: its input, the
convolution's output (the pool's input), the block's output and the
folded kernel. A jacobian taken w.r.t. that output then stops there
(pfor runs only the rest of the model), and `input_gradients` applies the
block's backward pass to the k cotangents with the per-image masks
broadcast over them, one XLA computation: 26 against ~88 ms for 9
candidates x 250 images (scratch microbenchmark, AMD EPYC Zen 4,
AVX-512). Same operations as the autodiff of the block (the pool's first
maximum, `pooling.max_pool`; the ReLU's gradient at 0 is 0), the shifted
tap sums in another order (float32 round-off).

A first block is the model's input feeding a Conv2D (3x3, stride 1,
"same", few input channels: `few_channels.applies`) whose BatchNorm
folds into it and feeds a ReLU that feeds a non-overlapping max pool alone
(`folding.relu_pool_pairs`): the quickstart CNN's and VGG's. Both forms
here take gray images only (`applies`).

The attacks' loops at a fixed batch size (flow-PGD, stAdv, the FGR
adversary) run such a block on gray images as one operation, `block`: the
pool and its ReLU by XLA keeping each window's winner, the input gradient
one XLA computation from the winners (the routing fused with the tap
products, as above), so the convolution's full-size gradient is never
written and its output never read again: flow-PGD 1.056x and stAdv
1.051x faster on the quickstart CNN (docs/PERFORMANCE.md, session 14).
"""

import contextlib
import dataclasses
import functools
import threading
import typing

import numpy as np
import tensorflow as tf

from fgr_tf import environment
from fgr_tf.backbones import few_channels
from fgr_tf.backbones import pooling

# How the attacks' loops at a fixed batch size (flow-PGD, stAdv, the FGR
# adversary) run a first block on gray images: "xla" (`block`) or "ops"
# (the folded convolution, TF's max pool and ReLU, and their gradients as
# elsewhere). FGR_TF_FIRST_BLOCK forces either.
BLOCK = environment.choice("FGR_TF_FIRST_BLOCK", "xla", ("xla", "ops"))


@dataclasses.dataclass
class Record:
  """A first block as it ran (all None until it runs in `record()`).

  Attributes:
    inputs: [B, H, W, C] the block's input (the images).
    pool_input: [B, H, W, C1] the convolution's output, BatchNorm folded.
    outputs: [B, H / ph, W / pw, C1] relu(max_pool(pool_input)).
    kernel: [3, 3, C, C1] the folded kernel.
    pool_size: (ph, pw), pixels.
  """
  inputs: typing.Any = None
  pool_input: typing.Any = None
  outputs: typing.Any = None
  kernel: typing.Any = None
  pool_size: typing.Any = None


class _Recorders(threading.local):
  def __init__(self):
    super().__init__()
    self.stack = []


_recorders = _Recorders()


@contextlib.contextmanager
def record():
  """Within the block, the first prepared inference function that runs a
  first block fills the yielded `Record` (one per block: a second forward
  pass does not overwrite it)."""
  entry = Record()
  _recorders.stack.append(entry)
  try:
    yield entry
  finally:
    _recorders.stack.pop()


def recording():
  """The innermost `record()` entry still empty, or None."""
  if _recorders.stack and _recorders.stack[-1].outputs is None:
    return _recorders.stack[-1]
  return None


def applies(entry):
  """Whether `input_gradients` takes the `Record` `entry`: a first block
  ran, on gray images (one channel). With more channels the fused tap
  products recompute the routing for each of their 9 C outputs (VGG's
  first block, 27 products of 64 channels, 9 candidates x 128 images: 750
  ms; 91 as a dot of the routed gradient written out, and then ADef on
  VGG-11 was 0.094 against pfor's 0.083 s per image)."""
  return entry.outputs is not None and gray(entry.kernel)


def gray(kernel):
  """Whether the [3, 3, C, C1] first-layer `kernel` takes gray images
  (C = 1), the only ones the forms here take."""
  return kernel.shape[2] == 1


def input_gradients(cotangents, pool_input, kernel, pool_size):
  """d/d inputs of sum(cotangent * block(inputs)) for each cotangent.

  Args:
    cotangents: [k, B, Ho, Wo, C1] at the block's output.
    pool_input: [B, H, W, C1] (`Record.pool_input`).
    kernel: [3, 3, 1, C1] the folded kernel (gray images: `applies`).
    pool_size: (ph, pw) of the non-overlapping pool, pixels.

  Returns:
    [k, B, H, W, 1]. Broadcasts the [B, ...] masks over the k cotangents
    (meant to run inside an XLA computation, which fuses them).
  """
  x = pooling.windows(pool_input, pool_size)  # [B, Ho, ph, Wo, pw, C1]
  y = tf.reduce_max(x, axis=[2, 4])
  return _routed_input_gradients(
      cotangents, pooling.first_max_mask(x, y), y, kernel,
      pool_input.shape[1:3])


def _routed_input_gradients(cotangents, mask, y, kernel, size):
  """`input_gradients` given the pool's 0/1 first-maximum mask [B, Ho, ph,
  Wo, pw, C1] and maxima y [B, Ho, Wo, C1]; size: the input's (H, W)."""
  k = tf.shape(cotangents)[0]
  height, width = size
  ph, pw, c1 = mask.shape[2], mask.shape[4], mask.shape[5]
  # Where the ReLU after the pool passes (y > 0).
  mask = mask * tf.cast(y > 0, mask.dtype)[:, :, None, :, None, :]
  routed = mask[None] * cotangents[:, :, :, None, :, None, :]
  routed = pooling.pad_to(tf.reshape(
      routed, [-1, (height // ph) * ph, (width // pw) * pw, c1]),
                          [None, height, width])
  # The 9 tap products as a multiply-and-sum, which XLA fuses with the
  # routing (as a dot the routed gradient is written out first: 50 against
  # 28 ms above).
  taps = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [c1, 9])
  products = tf.reduce_sum(routed[..., None] * taps, axis=-2)
  d_inputs = few_channels.sum_shifted_taps(tf.reshape(
      products, [-1, height, width, 3, 3, 1]))
  return tf.reshape(d_inputs, [k, tf.shape(cotangents)[1], height, width, 1])


def pool_with_winners(x, pool_size):
  """(y, winners) of NHWC `x` [B, H, W, C]: y = its non-overlapping "valid"
  max pool [B, Ho, Wo, C]; winners [B, Ho, Wo, C] int8, the row-major
  index in its window of each window's FIRST maximum (`pooling.
  first_max_mask`), ph * pw where there is none (a NaN)."""
  windows = pooling.windows(x, pool_size)
  ph, pw = pool_size
  y = tf.reduce_max(windows, axis=[2, 4])
  winners = tf.fill(tf.shape(y), tf.constant(ph * pw, tf.int8))
  for q in reversed(range(ph * pw)):
    winners = tf.where(tf.equal(windows[:, :, q // pw, :, q % pw, :], y),
                       tf.constant(q, tf.int8), winners)
  return y, winners


def winners_mask(winners, pool_size, dtype):
  """The 0/1 [B, Ho, ph, Wo, pw, C] mask of `pool_with_winners`' winners."""
  ph, pw = pool_size
  index = tf.constant(np.arange(ph * pw, dtype=np.int8).reshape(
      [1, 1, ph, 1, pw, 1]))
  return tf.cast(tf.equal(winners[:, :, None, :, None, :], index), dtype)


@functools.partial(tf.function, jit_compile=True)
def _forward_by_xla(z, pool_size):
  y, winners = pool_with_winners(z, pool_size)
  return tf.nn.relu(y), y, winners


@functools.partial(tf.function, jit_compile=True)
def _input_gradient_by_xla(dy, y, winners, kernel, size, pool_size):
  return _routed_input_gradients(
      dy[None], winners_mask(winners, pool_size, dy.dtype), y, kernel,
      size)[0]


def block(kernel, bias, pool_size):
  """images [B, H, W, 1] -> relu(max_pool(conv(images, kernel) + bias))
  (3x3, stride 1, "same"; the pool non-overlapping, "valid"), for loops
  at a fixed batch size (XLA compiles per shape).

  The pool and its ReLU run as one XLA computation that also keeps each
  window's winner (one byte per output), and the gradient w.r.t. the
  images is one XLA computation from those: routing, the 9 tap products
  and their shifted sums, without writing the full-size gradient of the
  convolution's output or reading its output again. The values of the
  pool's and the ReLU's own derivatives (`pooling.max_pool`: the first
  maximum; 0 at 0); kernel and bias gradients TF's. Under pfor the
  gradient is the autodiff of the same ops (`pooling.max_pool`).
  """

  def run(images):
    pool_input = []  # z, for a `record()` entry
    outputs = _block_call(pool_size, pool_input)(images, kernel, bias)
    entry = recording()
    if entry is not None:  # the tensors a jacobian can stop at
      entry.inputs, entry.pool_input, entry.kernel = (images, pool_input[0],
                                                      kernel)
      entry.outputs, entry.pool_size = outputs, tuple(pool_size)
    return outputs

  return run


def _block_call(pool_size, pool_input):
  """`block`'s custom-gradient function of (images, kernel, bias); appends
  the convolution's output to the list `pool_input`."""

  @tf.custom_gradient
  def call(images, kernel, bias):
    z = tf.nn.bias_add(tf.nn.conv2d(images, kernel, 1, "SAME"), bias)
    pool_input.append(z)
    outputs, y, winners = _forward_by_xla(z, tuple(pool_size))

    def grad(dy):
      if pooling.in_pfor():
        with tf.GradientTape() as tape:
          tape.watch([images, kernel, bias])
          again = tf.nn.relu(pooling.max_pool(tf.nn.bias_add(
              tf.nn.conv2d(images, kernel, 1, "SAME"), bias), pool_size))
        return tape.gradient(again, [images, kernel, bias],
                             output_gradients=dy)
      d_images = _input_gradient_by_xla(dy, y, winners, kernel,
                                        tuple(images.shape[1:3]),
                                        tuple(pool_size))
      # The kernel's and the bias' (not computed unless asked for).
      dz = pooling.unpool(dy * tf.cast(y > 0, dy.dtype),
                          winners_mask(winners, pool_size, dy.dtype),
                          z.shape)
      d_kernel = tf.compat.v1.nn.conv2d_backprop_filter(
          images, tf.shape(kernel), dz, [1, 1, 1, 1], "SAME")
      return d_images, d_kernel, tf.reduce_sum(dz, axis=[0, 1, 2])

    return outputs, grad

  return call
