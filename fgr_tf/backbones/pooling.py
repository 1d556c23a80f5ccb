"""Max pooling whose first and second derivatives pick the same element.

FGR differentiates the gradient of the loss, so a max pool is
differentiated twice: once by `MaxPoolGrad` (the first derivative, which
routes each window's upstream gradient to the element that won the
window) and once by the gradient of that (`MaxPoolGradGrad`). After a ReLU
many windows hold tied maxima (all zeros), and then WHICH element wins
matters: TensorFlow's CPU kernels take the first, while XLA's
`MaxPoolGradGrad` (tensorflow/compiler/tf2xla/kernels/pooling_ops.cc)
selects the window maximum from the input rounded to bfloat16 and takes
the LAST of tied maxima. Under XLA (the GPU default) the two derivatives
then disagree and the FGR parameter gradients of a conv-BN-ReLU-maxpool
net were off by 8-16% of their largest entry.

Here the winner of each window is chosen once, explicitly: the FIRST
maximum in row-major order (as PyTorch's and TF's CPU kernels do), and the
gradient routes through a constant 0/1 selection mask. The forward value
is TF's own max pool; the first derivative is `unpool(dy) * mask`, a
linear function of dy, so its own derivative (what FGR needs) picks the
same elements on every execution path: graph, XLA, GPU.
"""

import keras
import tensorflow as tf

from fgr_tf import environment


def first_max_mask(windows, pooled):
  """0/1 mask [B, Ho, ph, Wo, pw, C] of the first maximum of each window.

  Args:
    windows: [B, Ho, ph, Wo, pw, C]; window element (i, j) of output
      (y, x) is [:, y, i, x, j, :].
    pooled: [B, Ho, Wo, C], the window maxima (exact: max pooling only
      selects).

  Element (i, j) wins if it equals the maximum and no element before it in
  row-major order does. (A window with a NaN has no winner: zero gradient.)
  """
  ph, pw = windows.shape[2], windows.shape[4]
  is_max = tf.equal(windows, pooled[:, :, None, :, None, :])
  taken = None
  rows = []
  for i in range(ph):
    row = []
    for j in range(pw):
      wins = is_max[:, :, i, :, j, :]
      if taken is not None:
        wins, taken = (tf.logical_and(wins, tf.logical_not(taken)),
                       tf.logical_or(taken, wins))
      else:
        taken = wins
      row.append(tf.cast(wins, windows.dtype))
    rows.append(tf.stack(row, axis=3))
  return tf.stack(rows, axis=2)


def windows(x, size):
  """[B, H, W, C] -> [B, H // ph, ph, W // pw, pw, C] (rows/columns that
  do not fill a window are dropped, as "valid" pooling does)."""
  ph, pw = size
  height, width = x.shape[1] // ph, x.shape[2] // pw
  x = x[:, :height * ph, :width * pw, :]
  return tf.reshape(x, [-1, height, ph, width, pw, x.shape[3]])


def _pool_sum(values, mask):
  """sum over each window of values * mask: [B, H, W, C] -> [B, Ho, Wo, C]."""
  return tf.reduce_sum(windows(values, (mask.shape[2], mask.shape[4])) * mask,
                       axis=[2, 4])


def unpool(dy, mask, input_shape):
  """dy [B, Ho, Wo, C] routed to the mask's elements: [B, H, W, C]."""
  ph, pw = mask.shape[2], mask.shape[4]
  routed = tf.reshape(mask * dy[:, :, None, :, None, :],
                      [-1, dy.shape[1] * ph, dy.shape[2] * pw, dy.shape[3]])
  return pad_to(routed, input_shape)


def pad_to(t, input_shape):
  """[B, h, w, C] zero-padded at the bottom and right to the input's H, W
  (the rows and columns that "valid" pooling dropped)."""
  pad_h = input_shape[1] - t.shape[1]
  pad_w = input_shape[2] - t.shape[2]
  if pad_h or pad_w:
    t = tf.pad(t, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
  return t


# How the first derivative is computed inside a `tf.while_loop` (the
# attacks) on CPU: "xla" (default) or "native" (TF's MaxPoolGrad, as
# outside loops). oneDNN's graph rewrite gives MaxPoolGrad its fast kernel
# (which reads the argmax its forward MaxPool saved) only if it rewrote
# that MaxPool first; in a lowered loop it visits nodes in a depth-first
# order that the back edge can send into the backward pass before the
# forward, and that order changes from one trace to the next. Measured on
# VGG-11's 10-step flow-PGD (batch 128, Xeon): 0 to 5 of the 5 pools ran
# TF's own kernel (24 ms against ~2.5 for [128, 32, 32, 64]; up to 11% of
# the attack). `_unpool_by_xla` is the mask form as one XLA computation:
# 3-5 ms, whatever the order. Force with FGR_TF_POOL_LOOP_GRADIENT.
LOOP_GRADIENT = environment.choice("FGR_TF_POOL_LOOP_GRADIENT", "xla",
                                   ("xla", "native"))


@tf.function(jit_compile=True)
def _unpool_by_xla(x, y, dy, size):
  """`unpool(dy, first_max_mask(...))` compiled by XLA (on CPU a few
  fused loops instead of ~15 full-size TF ops)."""
  return unpool(dy, first_max_mask(windows(x, size), y), x.shape)


# How the second derivative (the derivative of the first, linear in its
# cotangent e: the sum of e over each window's first maximum) is computed:
# "xla" (default) or "ops". As TF ops the mask takes ~15 full-size passes
# (compare, logical and/or, casts, stacks); compiled by XLA they fuse into
# a few loops. Measured (Xeon, AVX-512, batch 128, `[128, 32, 32, 64]`
# input, ms): 5.1 against 29 (and 19 for TF's MaxPoolGradGrad, whose tie
# rule is not documented); VGG-11's FGR step (batch 128) 1.07x faster with
# AVX-512, 1.06x with AVX2 (`python -m bench.switches
# --switch=pool_second --modes=fgr --paired_rounds=12`). Force with
# FGR_TF_POOL_SECOND_DERIVATIVE.
SECOND_DERIVATIVE = environment.choice("FGR_TF_POOL_SECOND_DERIVATIVE", "xla",
                                       ("xla", "ops"))


@tf.function(jit_compile=True)
def _pool_sum_by_xla(x, y, e, size):
  """`_pool_sum(e, first_max_mask(...))` compiled by XLA."""
  return _pool_sum(e, first_max_mask(windows(x, size), y))


# Under pfor (ADef's jacobian: one input gradient per candidate class),
# whether the first derivative is the mask form: the mask depends on the
# forward pass only, so pfor computes it once, and the vectorized
# derivative is an upsampling and a product of 4-d tensors, where TF's
# MaxPoolGrad makes pfor tile the pool's input and output over the
# classes and run the kernel on a batch of classes x images.
PFOR_MASK = True


def _unpool_same_shape(dy, full_mask):
  """`unpool` as 4-d ops (pfor adds a dimension, and TF's broadcasting
  kernels take at most 5: a 5-d form failed under pfor too): dy repeated
  over each window, times the [B, H, W, C] mask."""
  ph = full_mask.shape[1] // dy.shape[1]
  pw = full_mask.shape[2] // dy.shape[2]
  up = tf.repeat(tf.repeat(dy, ph, axis=1), pw, axis=2)
  return pad_to(up, full_mask.shape) * full_mask


def in_pfor():
  """Whether ops are being added to a loop body that `pfor` will vectorize
  (`tape.jacobian`, ADef): pfor inlines XLA functions and cannot vectorize
  their 6-d broadcasts; it traces its body under the name scope
  "loop_body"."""
  graph = tf.compat.v1.get_default_graph()
  return "loop_body" in graph.get_name_scope().split("/")


def _in_while_loop():
  """Whether ops are being added to the body of a `tf.while_loop`, and not
  to a loop body that `pfor` will vectorize (`in_pfor`)."""
  if in_pfor():
    return False
  graph = tf.compat.v1.get_default_graph()
  while graph is not None:
    if type(graph).__name__ == "WhileBodyFuncGraph":
      return True
    graph = getattr(graph, "outer_graph", None)
  return False


def _native_first_derivative():
  """Whether TF's MaxPoolGrad may compute the first derivative.

  On CPU (graph and XLA) it routes to the first of tied maxima, like the
  mask (tested); cuDNN's tie rule is not documented, so with GPUs present
  the mask computes it too.
  """
  return not tf.config.list_logical_devices("GPU")


def max_pool(x, size=(2, 2)):
  """Non-overlapping "valid" max pooling (stride = window) of NHWC `x`.

  Args:
    x: [B, H, W, C] float, static H, W, C.
    size: (ph, pw) window = stride, in pixels.

  Returns:
    [B, H // ph, W // pw, C], equal to `tf.nn.max_pool2d(x, size, size,
    "VALID")`. Its gradient routes each window's upstream gradient to the
    FIRST of its tied maxima, and the gradient of that gradient picks the
    same element, on every execution path.
  """
  size = tuple(size)
  ksize = [1, size[0], size[1], 1]

  @tf.custom_gradient
  def pool(x):
    y = tf.nn.max_pool2d(x, size, size, "VALID")

    def mask():
      return tf.stop_gradient(first_max_mask(windows(x, size), y))

    def full_mask():  # [B, H, W, C], zero outside the windows
      return unpool(tf.ones_like(y), mask(), x.shape)

    @tf.custom_gradient
    def first_derivative(dy):
      if PFOR_MASK and in_pfor():
        dx = _unpool_same_shape(dy, full_mask())
      elif not _native_first_derivative():
        dx = unpool(dy, mask(), x.shape)
      elif LOOP_GRADIENT == "xla" and _in_while_loop():
        dx = _unpool_by_xla(x, y, dy, size)
      else:
        dx = tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=dy,
                                    ksize=ksize, strides=ksize,
                                    padding="VALID")

      def second_derivative(e):  # linear in e: differentiable again
        if SECOND_DERIVATIVE == "xla" and not in_pfor():
          return _pool_sum_by_xla(x, y, e, size)
        return _pool_sum(e, mask())

      return dx, second_derivative

    return y, first_derivative

  return pool(x)


def applies(inputs_shape, pool_size, strides, padding, data_format):
  """Whether a MaxPooling2D call can take `max_pool`."""
  if len(inputs_shape) != 4 or None in tuple(inputs_shape[1:]):
    return False
  return (tuple(pool_size) == tuple(strides) and padding == "valid" and
          data_format == "channels_last")


@keras.saving.register_keras_serializable(package="fgr_tf")
class MaxPooling2D(keras.layers.MaxPooling2D):
  """`keras.layers.MaxPooling2D` with consistent first/second derivatives.

  Non-overlapping "valid" NHWC pools (window = stride, static shape) take
  `max_pool`; any other configuration is Keras's. Same config.
  """

  def call(self, inputs):
    if applies(inputs.shape, self.pool_size, self.strides, self.padding,
               self.data_format):
      return max_pool(inputs, self.pool_size)
    return super().call(inputs)
