"""A gradient-free baseline: the worst of k random flows in flow-PGD's ball."""

import tensorflow as tf

from fgr_tf import errors
from fgr_tf import warp
from fgr_tf.attacks import common


def random_flow(model, images, labels, epsilon=0.01, tries=10, seed=0,
                padding="edge", jit_compile="auto"):
  """Worst of `tries` random flows, uniform in the L-inf ball of flow-PGD.

  Each try draws a flow uniformly in [-epsilon, epsilon] (NORMALIZED units,
  as `flow_pgd`) per pixel and component; per image the first try that
  fools the model is kept, else the one with the highest CE loss. Against
  `flow_pgd` at the same epsilon it measures what the optimization adds.

  Args:
    model: maps [B, H, W, C] images to logits; run with training=False.
    images: [B, H, W, C] floats in [0, 1].
    labels: [B] int true labels.
    epsilon: L-inf bound of the normalized flow, >= 0.
    tries: random flows per image, >= 1.
    seed: int seed, or a [2] int tensor (stateless, e.g. per training step).
    padding: "edge" or "zeros" outside the image (`dense_image_warp`).
    jit_compile: compile with XLA; "auto" = on GPU/TPU.

  Returns:
    `AttackResult`; `iterations` = tries used until success (all tries
    otherwise); `t_norm` in pixels.
  """
  images, labels = common.check_inputs(images, labels, "random_flow", model)
  if not epsilon >= 0:
    raise errors.UserError(
        f"epsilon must be >= 0. Received: epsilon={epsilon}")
  if int(tries) != tries or tries < 1:
    raise errors.UserError(
        f"tries must be an int >= 1. Received: tries={tries}")
  if padding not in warp.PADDINGS:
    raise errors.UserError(f"padding must be one of {warp.PADDINGS}. "
                           f"Received: padding={padding!r}")
  # epsilon is an argument of the compiled function: one trace serves
  # every budget.
  attack = common.compiled(
      model, ("random_flow", int(tries), padding),
      lambda: _build(model, int(tries), padding), jit_compile)
  return common.AttackResult(
      **attack(images, labels, common.stateless_seed(seed),
               tf.constant(float(epsilon), tf.float32)))


def _build(model, tries, padding):
  def attack(images, labels, seed, epsilon):
    shape = tf.shape(images)
    flow_shape = tf.stack([shape[0], shape[1], shape[2], 2])

    def flow_of(i):
      flow_xy = tf.random.stateless_uniform(
          flow_shape, tf.stack([seed[0], seed[1] + i]), -epsilon, epsilon)
      return warp.normalized_to_pixel_flow(flow_xy, shape[1], shape[2])

    # Prepared once, for the search and the result.
    prepared = warp.prepare_image(images, padding)
    flow, used = common.first_fooling_or_worst(
        model, prepared, labels, flow_of, tries, flow_shape)
    adv = common.deform(prepared, flow)
    logits = common.logits_of(model, adv)
    return dict(adv_images=adv, flow=flow,
                success=common.is_adversarial(logits, labels),
                iterations=used, t_norm=common.t_norm(flow),
                adv_logits=logits)

  return attack


INFO = common.AttackInfo(random_flow, kind="bounded", trains=True,
                         budget="epsilon",
                         budget_unit="L-inf normalized flow")
