"""Flow gradient regularization (FGR) and input gradient regularization (IGR).

The FGR penalty, in the original's units (SPEC §2):

    loss    = (1/B) sum_b CE(model(warp(x_b, f)), y_b)          at f = 0
    g       = d loss / d f                                      [B, H, W, 2]
    penalty = (1/B) sum_b sum_{h,w} ((W-1)/2 g_dx)^2 + ((H-1)/2 g_dy)^2

with `f` the pixel flow (dy, dx): `(H-1)/2 * g_dy` is the gradient w.r.t.
the original's normalized flow. `g` is the gradient of the batch MEAN, so
each sample's gradient carries 1/B and the penalty scales as 1/B^2: this is
what makes lambda = 300 at batch 128 reproduce the paper.

At f = 0 the warp is the identity and d warp / d f is a finite difference of
the image (`warp.zero_flow_jacobian`), so by the chain rule

    g_dy[b, h, w] = sum_c (d loss / d x)[b, h, w, c] * (d warp / d dy)[b, h, w, c]

needs only the input gradient: no gather, one backward pass, and the same
numbers as differentiating through `dense_image_warp` (tested).
"""

import tensorflow as tf

from fgr_tf import cross_entropy
from fgr_tf import warp


def _accumulation_dtype(dtype):
  """float64 stays float64; everything else (incl. mixed precision) -> float32."""
  return tf.float64 if dtype == tf.float64 else tf.float32


def sparse_ce_sum(logits, labels):
  """Sum over the batch of the sparse softmax cross-entropy (float32/64),
  with derivatives that stay accurate on confident predictions
  (`cross_entropy`)."""
  logits = tf.cast(logits, _accumulation_dtype(logits.dtype))
  labels = tf.cast(labels, tf.int32)
  return tf.reduce_sum(cross_entropy.sparse_cross_entropy(logits, labels))


def loss_and_input_gradient(model, images, labels, training=True,
                            global_batch_size=None):
  """Batch-mean CE and its gradient w.r.t. the images.

  Args:
    model: callable `model(images, training=...) -> logits [B, classes]`.
    images: [B, H, W, C] float32 (or float64) in [0, 1].
    labels: [B] ints.
    training: passed to the model (train-mode BatchNorm, as the original).
    global_batch_size: the B of the mean; defaults to this batch's size.
      Under tf.distribute pass the GLOBAL batch so that each replica's
      share sums to the global mean.

  Returns:
    (loss, input_grad, logits): scalar float32, [B, H, W, C] float32 (the
    gradient of `loss`, so it carries the 1/B factor), and the logits.
  """
  images = tf.convert_to_tensor(images)
  if global_batch_size is None:
    global_batch_size = tf.shape(images)[0]
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(images)
    logits = model(images, training=training)
    ce_sum = sparse_ce_sum(logits, labels)
  # Differentiate the SUM (no 1/B inside the backward pass: keeps float16
  # gradients away from underflow) and scale in float32 afterwards.
  input_grad = tape.gradient(ce_sum, images)
  inv_batch = 1.0 / tf.cast(global_batch_size, ce_sum.dtype)
  return (ce_sum * inv_batch, input_grad * tf.cast(inv_batch, images.dtype),
          logits)


def flow_gradient_from_input_gradient(images, input_grad):
  """d loss / d pixel flow at f = 0, from d loss / d images.

  Args:
    images: [B, H, W, C], the images the zero flow is applied to.
    input_grad: [B, H, W, C], d loss / d images.

  Returns:
    [B, H, W, 2] gradient w.r.t. the pixel flow (dy, dx), in loss/pixel.
  """
  d_dy, d_dx = warp.zero_flow_jacobian(images)
  return tf.stack([tf.reduce_sum(input_grad * d_dy, axis=-1),
                   tf.reduce_sum(input_grad * d_dx, axis=-1)], axis=-1)


def flow_gradient_via_warp(model, images, labels, training=True,
                           global_batch_size=None):
  """The original's computation, literally: grad of CE(model(warp(x, 0))).

  Slower than `flow_gradient_from_input_gradient` (it gathers); kept as the
  executable definition that the fast path is tested against.

  Returns:
    (loss, flow_grad): scalar batch-mean CE and d loss / d pixel flow
    [B, H, W, 2] (dy, dx).
  """
  images = tf.convert_to_tensor(images)
  if global_batch_size is None:
    global_batch_size = tf.shape(images)[0]
  flow = tf.zeros(tf.concat([tf.shape(images)[:3], [2]], 0), images.dtype)
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(flow)
    logits = model(warp.dense_image_warp(images, flow), training=training)
    ce_sum = sparse_ce_sum(logits, labels)
    loss = ce_sum / tf.cast(global_batch_size, ce_sum.dtype)
  return loss, tape.gradient(loss, flow)


def penalty_from_flow_gradient(flow_grad, global_batch_size=None):
  """(1/B) sum ((H-1)/2 g_dy)^2 + ((W-1)/2 g_dx)^2: the original's units.

  Args:
    flow_grad: [B, H, W, 2] d loss / d pixel flow (dy, dx).
    global_batch_size: the B of the mean (defaults to this batch's size).
  """
  dtype = _accumulation_dtype(flow_grad.dtype)
  flow_grad = tf.cast(flow_grad, dtype)
  shape = tf.shape(flow_grad)
  if global_batch_size is None:
    global_batch_size = shape[0]
  scale = tf.stack([tf.cast(shape[1] - 1, dtype) / 2.0,
                    tf.cast(shape[2] - 1, dtype) / 2.0])
  return tf.reduce_sum(tf.square(flow_grad * scale)) / tf.cast(
      global_batch_size, dtype)


def flow_gradient_penalty(model, images, labels, training=True,
                          global_batch_size=None):
  """FGR: (batch-mean CE, flow-gradient penalty in the original's units).

  Args:
    model: `model(images, training=...) -> logits`.
    images: [B, H, W, C] float32 in [0, 1].
    labels: [B] int class ids.
    training: forwarded to the model.
    global_batch_size: B of the batch mean (default: this batch's size).

  Returns:
    (loss, penalty), float32 scalars, both differentiable w.r.t. the
    model's weights. `loss + fgr_lambda * penalty` is the original's
    training objective.
  """
  loss, input_grad, _ = loss_and_input_gradient(
      model, images, labels, training, global_batch_size)
  flow_grad = flow_gradient_from_input_gradient(images, input_grad)
  return loss, penalty_from_flow_gradient(flow_grad, global_batch_size)


def input_gradient_penalty(model, images, labels, training=True,
                           global_batch_size=None):
  """IGR baseline: (batch-mean CE, (1/B) sum_b ||d loss / d x_b||^2).

  Same signature and conventions as `flow_gradient_penalty`; the gradient
  is that of the batch-mean CE w.r.t. the [0, 1] images.
  """
  loss, input_grad, _ = loss_and_input_gradient(
      model, images, labels, training, global_batch_size)
  return loss, input_penalty_from_input_gradient(input_grad, global_batch_size)


def input_penalty_from_input_gradient(input_grad, global_batch_size=None):
  """(1/B) sum over the batch of ||input_grad_b||^2."""
  input_grad = tf.cast(input_grad, _accumulation_dtype(input_grad.dtype))
  if global_batch_size is None:
    global_batch_size = tf.shape(input_grad)[0]
  return tf.reduce_sum(tf.square(input_grad)) / tf.cast(global_batch_size,
                                                        input_grad.dtype)
