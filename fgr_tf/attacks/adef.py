"""ADef (Alaifari, Alberti, Gauksson, ICLR 2019), batched in TensorFlow.

Follows foolbox 2's ADefAttack (SPEC §4): at each iteration, for each
candidate class k, f = Z_k - Z_label at the deformed image, the image's
spatial derivatives by central differences (one-sided at the borders),
alpha_j = sum_c dF/dx_c * d_j x_c with dF = d(Z_k - Z_label)/d image,
smoothed by a Gaussian (norm^2 computed after one smoothing, the field
smoothed a second time), field_k = -overshoot * f * alpha / norm^2 added to
the accumulated field; the candidate whose accumulated field has the
smallest L2 norm wins, and the ORIGINAL image is re-deformed with it. Each
image stops as soon as its label flips.
"""

import functools

import numpy as np
import tensorflow as tf

from fgr_tf import environment
from fgr_tf import errors
from fgr_tf import warp
from fgr_tf.attacks import common
from fgr_tf.backbones import first_block


def gaussian_kernel(sigma):
  """1-D Gaussian as scipy.ndimage.gaussian_filter (truncate 4.0)."""
  radius = int(4.0 * sigma + 0.5)
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  return kernel / tf.reduce_sum(kernel), radius


def gaussian_smooth(field, sigma):
  """Separable Gaussian blur of [B, H, W, K], scipy's 'reflect' border.

  sigma in pixels. Fields of at most `MATRIX_MAX_SIZE` pixels a side
  (static H, W, K) are smoothed by `_smooth_by_matrices` (any kernel
  radius: the border mirrored as often as it takes, as scipy does),
  larger ones by depthwise convolutions of the reflect-padded field, which
  need H, W > 4 * sigma + 0.5 (the kernel radius): the same weighted sums
  in another order.
  """
  if sigma <= 0:
    return field
  height, width, channels = field.shape[1:]
  if None not in (height, width, channels) and max(
      height, width) <= MATRIX_MAX_SIZE:
    return _smooth_by_matrices(field, sigma)
  kernel, radius = gaussian_kernel(sigma)
  channels = tf.shape(field)[-1]
  out = field
  for axis, shape in ((1, [2 * radius + 1, 1]), (2, [1, 2 * radius + 1])):
    padding = [[0, 0]] * 4
    padding[axis] = [radius, radius]
    # scipy's 'reflect' (d c b a | a b c d) is TF's SYMMETRIC.
    out = tf.pad(out, padding, mode="SYMMETRIC")
    depthwise = tf.tile(tf.reshape(kernel, shape + [1, 1]),
                        [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(out, depthwise, [1, 1, 1, 1], "VALID")
  return out


# Fields up to this many pixels a side are smoothed by two matmuls with
# the blur's [n, n] matrices (`_smooth_by_matrices`) instead of a
# reflect padding and a depthwise convolution per axis, whose padding
# (TF's MirrorPad) is slow. Measured (scratch microbenchmark, Xeon,
# AVX-512, [810, 28, 28, 2] = ADef's 9 candidates of 90 images, sigma
# 0.5): 2.6 against 6.8 ms. The matrices cost 2 n multiply-adds per value
# and axis against the convolution's 2 (4 sigma) + 1, so large images keep
# the convolution.
MATRIX_MAX_SIZE = 64


def blur_matrix(size, sigma):
  """[size, size] float32 G with (G v)[i] = the Gaussian blur of the 1-D
  signal v at i, scipy's 'reflect' border (the taps that fall outside
  fold back onto the pixels they mirror, as often as it takes)."""
  kernel, radius = gaussian_kernel(sigma)
  folds = np.zeros((2 * radius + 1, size, size), np.float32)
  for i in range(size):
    for tap in range(-radius, radius + 1):
      j = (i + tap) % (2 * size)  # mirrored as often as it takes
      folds[tap + radius, i, min(j, 2 * size - 1 - j)] += 1
  return tf.tensordot(kernel, tf.constant(folds), 1)


def _smooth_by_matrices(field, sigma):
  """`gaussian_smooth` of a [B, H, W, K] field (static H, W, K): along W
  one matmul of the [B H, W K] rows by kron(G_W, I_K)^T, along H a batch
  of G_H [H, H] by [H, W K] products."""
  height, width, channels = field.shape[1:]
  # [(w, c), (v, k)] = G_W[v, w] if c == k else 0.
  along_w = tf.reshape(
      tf.einsum("vw,ck->wcvk", blur_matrix(width, sigma), tf.eye(channels)),
      [width * channels, width * channels])
  rows = tf.reshape(field, [-1, width * channels])
  out = tf.reshape(tf.matmul(rows, tf.cast(along_w, field.dtype)),
                   [-1, height, width * channels])
  out = tf.matmul(tf.cast(blur_matrix(height, sigma), field.dtype)[None], out)
  return tf.reshape(out, [-1, height, width, channels])


def image_derivatives(images):
  """(d/dx, d/dy) of [B, H, W, C] images: central differences, one-sided
  at the borders (foolbox 2's _difference_map), per pixel."""
  def along(axis):
    n = tf.shape(images)[axis]
    take = lambda a, b: tf.gather(images, tf.range(a, n + b), axis=axis)
    central = (take(2, 0) - take(0, -2)) / 2.0
    first = take(1, -n + 2) - take(0, -n + 1)
    last = take(n - 1, 0) - take(n - 2, -1)
    return tf.concat([first, central, last], axis=axis)

  return along(2), along(1)


# The k candidates' gradients at one field: from one forward pass and the
# k backward passes vectorized into one batch (`tape.jacobian`, pfor), or
# (False) k separate forward and backward passes. Same values; measured on
# the quickstart's small CNN (batch 250, 10 classes), the shared forward
# made ADef 1.3x faster.
JACOBIAN = True

# With the jacobian: for models with a first block on gray images
# (`backbones.first_block.applies`: the quickstart CNN), "xla" stops the
# jacobian at the block's output and applies the block's and the warp's
# backward passes to the k candidates as one XLA computation (per `CHUNK`
# images when the batch shrinks: one compiled shape for any batch),
# instead of pfor's tiled masks; "pfor" differentiates through the block
# under pfor. Same operations, the first layer's tap sums in another
# order. Measured: ADef 1.22x faster on the quickstart CNN (AVX2 kernels
# 1.19x; docs/PERFORMANCE.md, session 14).
FIRST_BLOCK = environment.choice("FGR_TF_ADEF_FIRST_BLOCK", "xla",
                                 ("xla", "pfor"))
CHUNK = 32


def adef(model, images, labels, sigma=0.5, max_iter=100, overshoot=1.1,
         candidates=10, exact_gradient=True, jit_compile="auto"):
  """ADef: the smallest smooth deformation, by iterated linearization.

  Args:
    model: maps [B, H, W, C] images to logits; run with training=False.
    images: [B, H, W, C] floats in [0, 1].
    labels: [B] int true labels.
    sigma: std of the Gaussian smoothing of the field, in PIXELS (foolbox's
      `smooth`; 0 disables smoothing).
    max_iter: iterations at most per image.
    overshoot: factor >= 1 on each step (1 = plain ADef).
    candidates: number of candidate classes: the top logits of the clean
      image other than the label (foolbox's `subsample`).
    exact_gradient: linearize with the exact derivative of F(warp(x, tau))
      w.r.t. tau (autodiff through the bilinear warp). False uses foolbox's
      central differences of the image (sampled at p + tau); with bilinear
      sampling they misjudge a step's effect up to ~2.5x near edges, so the
      iteration can creep towards the boundary without crossing it
      (measured: 90% vs 98% success on a Fashion-MNIST CNN).
    jit_compile: compile with XLA; "auto" = on GPU/TPU.

  Returns:
    `AttackResult`; `iterations` = iterations each image used; `t_norm` the
    T-norm of the deformation in pixels.
  """
  images, labels = common.check_inputs(images, labels, "adef", model)
  if not sigma >= 0:
    raise errors.UserError(
        f"sigma must be >= 0 (pixels). Received: sigma={sigma}")
  if not overshoot >= 1:
    raise errors.UserError(
        f"overshoot must be >= 1. Received: overshoot={overshoot}")
  if int(max_iter) != max_iter or max_iter < 1:
    raise errors.UserError(
        f"max_iter must be an int >= 1. Received: max_iter={max_iter}")
  active_sets = common.use_active_sets(jit_compile)
  jacobian = JACOBIAN and (FIRST_BLOCK if exact_gradient else "pfor")
  key = ("adef", float(sigma), int(max_iter), float(overshoot),
         int(candidates), bool(exact_gradient), active_sets, jacobian)
  attack = common.compiled(model, key, lambda: _build(
      model, float(sigma), int(max_iter), float(overshoot), int(candidates),
      bool(exact_gradient), active_sets, jacobian), jit_compile,
      varying_batch=active_sets)
  return common.AttackResult(**attack(images, labels))


def _build(model, sigma, max_iter, overshoot, num_candidates, exact_gradient,
           active_sets, jacobian):
  """The attack. `active_sets`: each iteration runs on the images not yet
  fooled only (gathered, then scattered back), so an iteration costs what
  its remaining images need; else on the whole batch, finished images
  masked (fixed shapes, for XLA). `jacobian`: the candidates share one
  forward pass (`JACOBIAN`), "xla" or "pfor" (`FIRST_BLOCK`), or False.
  Same result either way.

  The field is kept as our warp's pixel flow (dy, dx) = -(tau_y, tau_x)
  (ADef samples x at p + tau(p), (x, y) order; the warp at p - flow): a
  signed swap of the channels, under which the gradients, their
  smoothings, norms and steps are the same numbers (negation and order are
  exact), so the loop needs no conversion."""

  def linearization(prepared, images, labels, flow, target):
    """(f, alpha): f = Z_target - Z_label [B] and d f / d flow
    [B, H, W, 2]."""
    if exact_gradient:
      with tf.GradientTape() as tape:
        tape.watch(flow)
        z = common.logits_of(model, common.deform(prepared, flow))
        f = (tf.gather(z, target, batch_dims=1) -
             tf.gather(z, labels, batch_dims=1))
        f_sum = tf.reduce_sum(f)
      return f, tape.gradient(f_sum, flow)
    deformed = common.deform(prepared, flow)
    # Central differences of the original image, sampled where the flow
    # sends each pixel (d/d tau of x(p + tau(p)); d/d flow = -d/d tau).
    derivatives = tf.concat(image_derivatives(images), axis=-1)
    channels = tf.shape(images)[3]
    sampled = warp.dense_image_warp(derivatives, flow)
    with tf.GradientTape() as tape:
      tape.watch(deformed)
      z = common.logits_of(model, deformed)
      f = (tf.gather(z, target, batch_dims=1) -
           tf.gather(z, labels, batch_dims=1))
      f_sum = tf.reduce_sum(f)
    grad = tape.gradient(f_sum, deformed)
    return f, tf.stack(
        [-tf.reduce_sum(grad * sampled[..., channels:], -1),
         -tf.reduce_sum(grad * sampled[..., :channels], -1)], axis=-1)

  def linearizations(prepared, images, labels, flow, candidates):
    """f [k, B] and alpha [k, B, H, W, 2] of the k candidates: one forward
    pass, then their backward passes as one batch (`tape.jacobian`)."""
    if not exact_gradient or not jacobian:
      pairs = [linearization(prepared, images, labels, flow, candidates[:, j])
               for j in range(candidates.shape[1])]
      return (tf.stack([f for f, _ in pairs]),
              tf.stack([alpha for _, alpha in pairs]))
    with tf.GradientTape() as tape:
      tape.watch(flow)
      deformed = common.deform(prepared, flow)
      with first_block.record() as block:
        z = common.logits_of(model, deformed)
      f = (tf.gather(z, candidates, batch_dims=1) -
           tf.gather(z, labels, batch_dims=1)[:, None])  # [B, k]
      f_sums = tf.reduce_sum(f, axis=0)
    if (jacobian != "xla" or not first_block.applies(block) or
        not _same_tensor(block.inputs, deformed)):
      return tf.transpose(f), tape.jacobian(f_sums, flow)
    cotangents = tape.jacobian(f_sums, block.outputs)  # [k, B, ...]
    args = (cotangents, block.pool_input, prepared.neighbourhoods, flow)
    gradients = functools.partial(_candidate_flow_gradients,
                                  kernel=block.kernel,
                                  pool_size=block.pool_size,
                                  padding=prepared.padding)
    if active_sets:
      return tf.transpose(f), _in_chunks(gradients, *args, chunk=CHUNK,
                                         image_shape=flow.shape[1:])
    return tf.transpose(f), gradients(*args)

  def smooth(alphas):
    """gaussian_smooth of [k, B, H, W, 2], the k candidates as one batch
    (sigma 0: unchanged)."""
    if sigma <= 0:
      return alphas
    shape = tf.shape(alphas)
    return tf.reshape(gaussian_smooth(
        tf.reshape(alphas, tf.concat([[-1], shape[2:]], 0)), sigma), shape)

  def step(prepared, images, labels, candidates, flow):
    """One iteration on a batch: (the new flow, fooled by it)."""
    batch = tf.shape(flow)[0]
    f, alphas = linearizations(prepared, images, labels, flow, candidates)
    # foolbox: the norm after one smoothing, the step smoothed twice.
    alphas = smooth(alphas)
    norm2 = tf.reduce_sum(tf.square(alphas), axis=[2, 3, 4])
    alphas = smooth(alphas)
    scale = -overshoot * f / tf.maximum(norm2, 1e-12)  # [k, B]
    steps = flow[None] + scale[:, :, None, None, None] * alphas
    k = candidates.shape[1]
    norms = tf.norm(tf.reshape(steps, [k, batch, -1]), axis=-1)
    # The first candidate of the smallest norm (NaN and inf never win).
    best = tf.fill([batch], float("inf"))
    choice = tf.zeros([batch], tf.int32)
    for j in range(k):
      take = norms[j] < best
      best = tf.where(take, norms[j], best)
      choice = tf.where(take, j, choice)
    chosen = tf.gather_nd(steps, tf.stack([choice, tf.range(batch)], -1))
    best_flow = common.where_per_image(best < float("inf"), chosen, flow)
    now = common.is_adversarial(
        common.logits_of(model, common.deform(prepared, best_flow)), labels)
    return best_flow, now

  def attack(images, labels):
    shape = tf.shape(images)
    batch = shape[0]
    logits = common.logits_of(model, images)
    classes = logits.shape[-1]
    k = min(num_candidates, classes - 1)
    others = logits - 1e9 * tf.one_hot(labels, classes)
    candidates = tf.math.top_k(others, k=k).indices  # [B, k]
    flow = tf.zeros(tf.stack([batch, shape[1], shape[2], 2]))
    done = common.is_adversarial(logits, labels)
    iterations = tf.zeros([batch], tf.int32)
    prepared = warp.prepare_image(images)

    def body(i, flow, done, iterations):
      if active_sets:
        index = common.active_indices(tf.logical_not(done))
        new_flow, now = step(
            warp.PreparedImage(tf.gather(prepared.neighbourhoods, index),
                               prepared.padding),
            *(tf.gather(t, index) for t in (images, labels, candidates,
                                            flow)))
        return (i + 1, common.scatter(flow, index, new_flow),
                common.scatter(done, index, now),
                tf.tensor_scatter_nd_add(iterations, index[:, None],
                                         tf.ones_like(index)))
      best_flow, now = step(prepared, images, labels, candidates, flow)
      active = tf.logical_not(done)
      flow = common.where_per_image(active, best_flow, flow)
      iterations += tf.cast(active, tf.int32)
      return i + 1, flow, tf.logical_or(done, now), iterations

    _, flow, _, iterations = tf.while_loop(
        lambda i, flow, done, it: tf.logical_and(
            i < max_iter, tf.logical_not(tf.reduce_all(done))),
        body, (tf.constant(0), flow, done, iterations))
    adv = common.deform(prepared, flow)
    adv_logits = common.logits_of(model, adv)
    return dict(adv_images=adv, flow=flow,
                success=common.is_adversarial(adv_logits, labels),
                iterations=iterations, t_norm=common.t_norm(flow),
                adv_logits=adv_logits)

  return attack


def _same_tensor(a, b):
  """Whether graph tensors `a` and `b` are one (Keras may hand a layer
  another Python object for the model's input tensor)."""
  return a is b or (hasattr(a, "graph") and hasattr(b, "graph") and
                    a.graph is b.graph and a.name == b.name)


@functools.partial(tf.function, jit_compile=True)
def _candidate_flow_gradients(cotangents, pool_input, neighbourhoods, flow,
                              kernel, pool_size, padding):
  """[k, B, H, W, 2] d/d flow of sum(cotangent * first block output) for
  each of the k cotangents [k, B, Ho, Wo, C1], the block's input being
  `common.deform` of the prepared image (`neighbourhoods`, `padding`) by
  `flow` [B, H, W, 2] (`first_block.input_gradients`, then the deform's
  backward pass for the k candidates as one batch)."""
  d_images = first_block.input_gradients(cotangents, pool_input, kernel,
                                         pool_size)  # [k, B, H, W, C]
  # The deform is pointwise in the flow: its [B, H, W, C, 2] jacobian from
  # C backward passes (one per channel), applied to the k candidates.
  channels = d_images.shape[-1]
  jacobian = tf.stack([
      common.deform_vjp(neighbourhoods, flow, tf.one_hot(
          tf.fill(tf.shape(flow)[:3], c), channels, dtype=flow.dtype),
                        padding, False, "flow")
      for c in range(channels)], axis=-2)
  return tf.reduce_sum(d_images[..., None] * jacobian[None], axis=-2)


def _in_chunks(function, cotangents, *per_image, chunk, image_shape):
  """`function(cotangents, *per_image)` [k, B, *image_shape] computed
  `chunk` images at a time, so that XLA compiles one shape for any batch
  size: the last chunk overlaps the one before it (a batch smaller than
  `chunk` is zero-padded). `cotangents` [k, B, ...], `per_image` [B,
  ...]."""
  batch = tf.shape(cotangents)[1]
  pad = tf.maximum(chunk - batch, 0)
  padded = lambda t, axis: tf.cond(pad > 0, lambda: tf.pad(
      t, [[0, 0]] * axis + [[0, pad]] + [[0, 0]] * (t.shape.rank - axis - 1)),
                                   lambda: t)
  cotangents = padded(cotangents, 1)
  per_image = [padded(t, 0) for t in per_image]
  count = (batch + pad + chunk - 1) // chunk

  def body(i, outputs):
    start = tf.minimum(i * chunk, batch + pad - chunk)
    part = slice(start, start + chunk)
    values = function(cotangents[:, part], *(t[part] for t in per_image))
    # [chunk, k, ...], without the rows the chunk before computed.
    values = tf.transpose(values, [1, 0] + list(range(2, values.shape.rank)))
    return i + 1, outputs.write(i, values[i * chunk - start:])

  _, outputs = tf.while_loop(
      lambda i, _: i < count, body,
      (0, tf.TensorArray(cotangents.dtype, size=count, infer_shape=False,
                         element_shape=[None, cotangents.shape[0]] +
                         list(image_shape))))
  merged = outputs.concat()[:batch]  # [B, k, *image_shape]
  return tf.transpose(merged, [1, 0] + list(range(2, merged.shape.rank)))


INFO = common.AttackInfo(adef, kind="minimal")
