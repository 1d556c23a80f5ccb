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
(`folding.relu_pool_pairs`): the quickstart CNN's and VGG's.
"""

import contextlib
import dataclasses
import threading
import typing

import tensorflow as tf

from fgr_tf.backbones import few_channels
from fgr_tf.backbones import pooling


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
  return entry.outputs is not None and entry.kernel.shape[2] == 1


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
  k = tf.shape(cotangents)[0]
  height, width, c1 = pool_input.shape[1:]
  ph, pw = pool_size
  x = pooling.windows(pool_input, pool_size)  # [B, Ho, ph, Wo, pw, C1]
  y = tf.reduce_max(x, axis=[2, 4])
  # The pool's first maximum, where the ReLU after it passes (y > 0).
  mask = pooling.first_max_mask(x, y) * tf.cast(
      y > 0, x.dtype)[:, :, None, :, None, :]
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
