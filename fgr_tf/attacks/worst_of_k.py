"""Gradient-free worst-of-k rotations and translations (Engstrom et al. 2019)."""

import math

import tensorflow as tf

from fgr_tf import errors
from fgr_tf import warp
from fgr_tf.attacks import common


def rigid_flow(height, width, angle_deg, shift_y, shift_x):
  """Pixel flow (dy, dx) [B, H, W, 2] of a rotation about the centre
  followed by a translation; angle in degrees, shifts in pixels ([B] each).

  The output pixel p samples the input at R^-1 (p - c - t) + c.
  """
  theta = -angle_deg * math.pi / 180.0
  cos, sin = tf.cos(theta)[:, None, None], tf.sin(theta)[:, None, None]
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  ys, xs = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  y = ys[None] - cy - shift_y[:, None, None]
  x = xs[None] - cx - shift_x[:, None, None]
  sample_y = cos * y + sin * x + cy
  sample_x = -sin * y + cos * x + cx
  return tf.stack([ys[None] - sample_y, xs[None] - sample_x], axis=-1)


def worst_of_k(model, images, labels, max_angle=30.0, max_shift=0.1,
               grid=True, tries=10, seed=0, padding="edge",
               jit_compile="auto"):
  """Worst of a grid (or k random) rotations + translations.

  No gradients: it shows robustness that does not come from gradient
  masking. Per image the first misclassifying transform is kept, else the
  one with the highest CE loss. The grid (Engstrom et al. 2019: 31 angles
  x 5 x 5 shifts) is the evaluation default: 10 random tries overstated
  robust accuracy about tenfold on Fashion-MNIST CNNs (0.40 vs 0.04);
  random tries are for adversarial training.

  Args:
    model: maps [B, H, W, C] images to logits; run with training=False.
    images: [B, H, W, C] floats in [0, 1].
    labels: [B] int true labels.
    max_angle: rotations in [-max_angle, max_angle] degrees.
    max_shift: translations in [-max_shift, max_shift] * image size.
    grid: try the grid of 31 angles x 5 x 5 shifts (775 transforms).
    tries: with grid=False, random transforms per image.
    seed: with grid=False, int seed of the random transforms, or a [2]
      int tensor (a stateless seed, e.g. one per training step).
    padding: "edge" (border value) or "zeros" (Engstrom et al.) outside the
      image (`dense_image_warp`).
    jit_compile: compile with XLA; "auto" = on GPU/TPU.

  Returns:
    `AttackResult`; `iterations` = transforms tried until success (all
    tries otherwise); `t_norm` the largest displacement in pixels.
  """
  images, labels = common.check_inputs(images, labels, "worst_of_k", model)
  if grid:
    angles = tf.linspace(-max_angle, max_angle, 31)
    shifts = tf.linspace(-max_shift, max_shift, 5)
    a, sy, sx = tf.meshgrid(angles, shifts, shifts, indexing="ij")
    params = tf.stack([tf.reshape(a, [-1]), tf.reshape(sy, [-1]),
                       tf.reshape(sx, [-1])], axis=-1)
  else:
    if int(tries) != tries or tries < 1:
      raise errors.UserError(
          f"tries must be an int >= 1. Received: tries={tries}")
    unit = tf.random.stateless_uniform(
        [int(tries), 3], common.stateless_seed(seed), -1.0, 1.0)
    params = unit * [max_angle, max_shift, max_shift]
  if padding not in warp.PADDINGS:
    raise errors.UserError(f"padding must be one of {warp.PADDINGS}. "
                           f"Received: padding={padding!r}")
  active_sets = common.use_active_sets(jit_compile)
  attack = common.compiled(
      model, ("worst_of_k", padding, active_sets),
      lambda: _build(model, padding, active_sets), jit_compile,
      varying_batch=active_sets)
  return common.AttackResult(**attack(images, labels, params))


# With active sets, a forward pass takes up to this many images: the
# images still unfooled, each with as many consecutive transforms as fit.
TRANSFORMS_BATCH = 1024


def _build(model, padding, active_sets):
  """The attack. `active_sets`: each pass runs the images not yet fooled
  only, each with the next several transforms of the list (about
  `TRANSFORMS_BATCH` images per forward pass), and keeps, per image, what
  trying them one by one in order keeps; else one transform per pass on
  the whole batch, fooled images masked (fixed shapes, for XLA)."""

  def flows_of(params, height, width):
    """Pixel flows [N, H, W, 2] of N transforms (angle, shift_y, shift_x)."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    return rigid_flow(height, width, params[:, 0], params[:, 1] * h,
                      params[:, 2] * w)

  def attack(images, labels, params):
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    # Prepared once, for the search and the result.
    prepared = warp.prepare_image(images, padding)
    if active_sets:
      chosen, used = _search_active(prepared, labels, params, batch, height,
                                    width)
      # The transform each image keeps; -1 (none: NaN losses) is no flow.
      flow = flows_of(tf.gather(params, tf.maximum(chosen, 0)), height, width)
      flow = common.where_per_image(chosen >= 0, flow, tf.zeros_like(flow))
    else:
      flow, used = _search_fixed(prepared, labels, params, batch, height,
                                 width)
    adv = common.deform(prepared, flow)
    logits = common.logits_of(model, adv)
    return dict(adv_images=adv, flow=flow,
                success=common.is_adversarial(logits, labels),
                iterations=used, t_norm=common.t_norm(flow),
                adv_logits=logits)

  def _search_fixed(prepared, labels, params, batch, height, width):
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ones = tf.ones([batch])

    def flow_of(p):
      return rigid_flow(height, width, p[0] * ones, p[1] * h * ones,
                        p[2] * w * ones)

    return common.first_fooling_or_worst(
        model, prepared, labels, lambda i: flow_of(params[i]),
        tf.shape(params)[0], tf.stack([batch, height, width, 2]))

  def _search_active(prepared, labels, params, batch, height, width):
    """(index of the kept transform [B], transforms tried [B])."""
    tries = tf.shape(params)[0]

    def body(i, best_loss, chosen, done, used):
      index = common.active_indices(tf.logical_not(done))
      n = tf.shape(index)[0]
      # The next `count` transforms for each of the n images, image-major.
      count = tf.minimum(tf.maximum(TRANSFORMS_BATCH // n, 1), tries - i)
      flows = flows_of(params[i:i + count], height, width)
      repeated = tf.repeat(tf.gather(prepared.neighbourhoods, index), count,
                           axis=0)
      adv = common.deform(warp.PreparedImage(repeated, padding),
                          tf.tile(flows, [n, 1, 1, 1]))
      logits = common.logits_of(model, adv)
      own = tf.repeat(tf.gather(labels, index), count)
      loss = tf.reshape(
          tf.nn.sparse_softmax_cross_entropy_with_logits(own, logits),
          [n, count])
      fooled = tf.reshape(common.is_adversarial(logits, own), [n, count])
      # What trying them in order keeps: the first fooling transform, else
      # the first of the highest losses if above the best so far (NaN
      # losses are never taken, as `loss > best` is False for them).
      loss = tf.where(tf.math.is_nan(loss), float("-inf"), loss)
      position = tf.range(count)[None]
      first_fooled = tf.reduce_min(tf.where(fooled, position, count), axis=1)
      highest = tf.reduce_max(loss, axis=1)
      first_highest = tf.reduce_min(
          tf.where(loss == highest[:, None], position, count), axis=1)
      fooled_any = first_fooled < count
      old_loss = tf.gather(best_loss, index)
      better = tf.logical_or(fooled_any, highest > old_loss)
      pick = tf.where(fooled_any, first_fooled, first_highest)
      new_loss = tf.where(better, tf.gather(loss, pick, batch_dims=1),
                          old_loss)
      new_chosen = tf.where(better, i + pick, tf.gather(chosen, index))
      tried = tf.where(fooled_any, first_fooled + 1, count)
      return (i + count, common.scatter(best_loss, index, new_loss),
              common.scatter(chosen, index, new_chosen),
              common.scatter(done, index, fooled_any),
              tf.tensor_scatter_nd_add(used, index[:, None], tried))

    _, _, chosen, _, used = tf.while_loop(
        lambda i, best_loss, chosen, done, used: tf.logical_and(
            i < tries, tf.logical_not(tf.reduce_all(done))), body,
        (tf.constant(0), tf.fill([batch], -1.0),
         tf.fill([batch], -1), tf.zeros([batch], tf.bool),
         tf.zeros([batch], tf.int32)))
    return chosen, used

  return attack


INFO = common.AttackInfo(worst_of_k, kind="bounded", trains=True,
                         budget="max_angle", budget_unit="degrees")
