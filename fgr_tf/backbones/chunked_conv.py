"""Convolutions whose kernel gradient is summed over chunks of the batch.

A kernel gradient sums x * dy over every batch position (B * H * W terms).
oneDNN's AVX2 backward-weights kernels accumulate that sum in long float32
runs: measured on a Xeon capped with ONEDNN_MAX_CPU_ISA=AVX2, VGG-13's
32x32 conv1 kernel gradient of `ce + 300 FGR` came out 1.2e-4 (of its
largest entry) off float64 (graph path, batch 16, briefly trained weights,
Fashion-MNIST), against 2.9e-6 with the AVX-512 kernels and 1.5e-6 with
TF's Eigen kernels (TF_ENABLE_ONEDNN_OPTS=0). Summing the gradient in
chunks of at most `MAX_POSITIONS` positions (here: 4 images of 32x32)
brought it to 2.8e-5, one image per chunk to 5.4e-6. The chunks are
summed in float32 by one add of a few kernel-sized tensors.

The forward pass and d x are TF's ops unchanged; d kernel is
`conv2d_backprop_filter` per chunk (zero-padded to whole chunks when the
batch is not a multiple), and the gradient of d x w.r.t. the kernel
(FGR's second order) is chunked the same way. Every piece is a
differentiable TF op, so second derivatives stay exact (float64 tests).
Under XLA (whose convolution gradients measured accurate) and for
non-float32 inputs the layer keeps TF's convolution.
"""

import os

import tensorflow as tf
# pylint: disable-next=g-direct-tensorflow-import
from tensorflow.python.ops import control_flow_util

# Largest number of batch positions (images x output pixels) one
# backward-weights call sums; FGR_TF_FILTER_GRAD_POSITIONS=0 turns the
# chunking off. Measured on VGG-11, batch 128 (Xeon, 2 interleaved
# rounds, images/s, chunked / not): AVX-512 FGR 145.9 / 147.8, plain
# 337.7 / 351.1; AVX2 FGR 103.4 / 98.0, plain 229.6 / 225.4, i.e. within
# the rounds' own 3-8% spread; inference keeps TF's fused conv + bias.
MAX_POSITIONS = int(os.environ.get("FGR_TF_FILTER_GRAD_POSITIONS", "4096"))


def applies(x, kernel, dilations):
  """Whether `conv2d` chunks this call: float32 NHWC, no dilation (TF's
  CPU gradient kernels have none), outside XLA."""
  return (MAX_POSITIONS > 0 and tuple(dilations) == (1, 1) and
          x.dtype == tf.float32 and
          kernel.dtype == tf.float32 and len(x.shape) == 4 and
          not control_flow_util.GraphOrParentsInXlaContext(
              tf.compat.v1.get_default_graph()))


def conv2d(x, kernel, strides, padding, dilations):
  """`tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)`
  (NHWC) with the kernel gradients summed over batch chunks.

  Args:
    x: [B, H, W, C_in] float32, static H and W.
    kernel: [kh, kw, C_in, C_out] float32.
    strides, dilations: (height, width) ints (dilations > 1: TF's CPU
      kernels have no gradient for them; `applies` is False).
    padding: "SAME" or "VALID".

  Returns:
    [B, H_out, W_out, C_out].
  """
  strides4 = [1, strides[0], strides[1], 1]
  dilations4 = [1, dilations[0], dilations[1], 1]

  def filter_gradient(inputs, cotangent):
    """sum over batch positions of inputs (x) cotangent, chunk by chunk."""
    positions = cotangent.shape[1] * cotangent.shape[2]
    size = max(1, MAX_POSITIONS // positions)

    def one(a, b):
      return tf.compat.v1.nn.conv2d_backprop_filter(
          a, tf.shape(kernel), b, strides4, padding, dilations=dilations4)

    batch = inputs.shape[0]
    if batch is not None and batch <= size:
      return one(inputs, cotangent)
    if batch is not None and batch % size == 0:
      return tf.add_n([one(a, b) for a, b in zip(
          tf.split(inputs, batch // size), tf.split(cotangent, batch // size))])
    # Dynamic or ragged batch: pad to whole chunks (zero rows add nothing).
    count = (tf.shape(inputs)[0] + size - 1) // size
    extra = count * size - tf.shape(inputs)[0]

    def chunks(t):
      t = tf.pad(t, [[0, extra], [0, 0], [0, 0], [0, 0]])
      return tf.reshape(t, tf.concat([[count, size], tf.shape(t)[1:]], 0))

    parts = tf.map_fn(lambda ab: one(ab[0], ab[1]),
                      (chunks(inputs), chunks(cotangent)),
                      fn_output_signature=kernel.dtype)
    return tf.reduce_sum(parts, axis=0)

  @tf.custom_gradient
  def forward(x, kernel):
    y = tf.nn.conv2d(x, kernel, strides4, padding, dilations=dilations4)

    def grad(dy):
      return transpose(dy, kernel, tf.shape(x)), filter_gradient(x, dy)

    return y, grad

  @tf.custom_gradient
  def transpose(dy, kernel, x_shape):
    dx = tf.compat.v1.nn.conv2d_backprop_input(
        x_shape, kernel, dy, strides4, padding, dilations=dilations4)
    dx = tf.ensure_shape(dx, x.shape)

    def grad(e):
      return forward(e, kernel), filter_gradient(e, dy), None

    return dx, grad

  return forward(x, kernel)
