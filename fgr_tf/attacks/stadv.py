"""stAdv (Xiao et al., ICLR 2018): spatially transformed adversarial examples."""

import tensorflow as tf

from fgr_tf import errors
from fgr_tf.attacks import common


def flow_smoothness(flow, eps=1e-8):
  """stAdv's L_flow per image [B]: sum_p sum_{q in N(p)} sqrt(|du|^2+|dv|^2+eps).

  N(p) are the 4-neighbours; the flow is edge-padded (the border pixel is
  its own neighbour, contributing sqrt(eps)). Flow in pixels [B, H, W, 2].
  """
  padded = tf.pad(flow, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
  centre = padded[:, 1:-1, 1:-1]
  total = 0.0
  for neighbour in (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                    padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]):
    total += tf.reduce_sum(
        tf.sqrt(tf.reduce_sum(tf.square(neighbour - centre), -1) + eps),
        axis=[1, 2])
  return total


def stadv(model, images, labels, tau=0.05, kappa=0.0, steps=200,
          learning_rate=0.05, search_steps=3, target=None,
          jit_compile="auto"):
  """stAdv: minimize margin(x_f) + tau * L_flow(f) over a pixel flow f.

  The paper optimizes with L-BFGS; this uses Adam with a fixed number of
  `steps` on the whole batch at once (each image's objective is separate)
  and keeps, per image, the successful flow with the smallest L_flow seen.
  As C&W and advertorch do with their constant, images that no step made
  adversarial are optimized again from zero with tau / 10, up to
  `search_steps` rounds in all: with tau = 0.05 the smoothness term alone
  wins for about 40% of the images of a briefly trained Fashion-MNIST CNN.

  Args:
    model: maps [B, H, W, C] images to logits; run with training=False.
    images: [B, H, W, C] floats in [0, 1].
    labels: [B] int true labels.
    tau: weight of the smoothness loss L_flow (0.05 as in the paper).
    kappa: confidence margin of the C&W loss, >= 0.
    steps: Adam iterations per search step.
    learning_rate: Adam step size, in pixels.
    search_steps: rounds in all, each with tau / 10 for the images not yet
      adversarial (1 = a single run with `tau`); the rounds stop early
      when every image is adversarial. Works inside a tf.function.
    target: optional [B] int target classes (targeted attack).
    jit_compile: compile with XLA; "auto" = on GPU/TPU.

  Returns:
    `AttackResult`; `iterations` counts the Adam steps (over all search
    rounds) until each image first became adversarial (all steps if never).
  """
  images, labels = common.check_inputs(images, labels, "stadv", model)
  if not tau >= 0 or not kappa >= 0:
    raise errors.UserError(f"tau and kappa must be >= 0. Received: tau={tau}, "
                           f"kappa={kappa}")
  for name, value in (("steps", steps), ("search_steps", search_steps)):
    if int(value) != value or value < 1:
      raise errors.UserError(f"{name} must be an int >= 1. Received: "
                             f"{name}={value}")
  targeted = target is not None
  target = tf.cast(labels if target is None else target, tf.int32)
  active_sets = common.use_active_sets(jit_compile)
  key = ("stadv", float(kappa), int(steps), float(learning_rate), targeted,
         int(search_steps), active_sets)
  attack = common.compiled(model, key, lambda: _build(
      model, float(kappa), int(steps), float(learning_rate), targeted,
      int(search_steps), active_sets), jit_compile)
  taus = tf.fill([tf.shape(images)[0]], float(tau))
  return common.AttackResult(**attack(images, labels, target, taus))


def _build(model, kappa, steps, learning_rate, targeted, search_steps,
           active_sets):
  """The attack, all search rounds in one graph (it also runs inside a
  compiled training step, where a Python `if` on a tensor cannot).
  `active_sets`: rounds after the first run on the images still not
  adversarial only (gathered, then scattered back); else on the whole
  batch, their results kept for those images only (fixed shapes, for XLA).
  Same result either way: each image's optimization is its own."""
  beta1, beta2, adam_eps = 0.9, 0.999, 1e-8

  def one_round(images, labels, target, tau):
    target_or_none = target if targeted else None
    shape = tf.shape(images)
    batch = shape[0]
    flow = tf.zeros(tf.stack([batch, shape[1], shape[2], 2]))
    state = dict(
        i=tf.constant(0), flow=flow, m=tf.zeros_like(flow),
        v=tf.zeros_like(flow), best_flow=flow,
        best_smooth=tf.fill([batch], float("inf")),
        first_success=tf.fill([batch], steps))

    def step(s):
      with tf.GradientTape() as tape:
        tape.watch(s["flow"])
        logits = common.logits_of(model, common.deform(images, s["flow"]))
        smooth = flow_smoothness(s["flow"])
        objective = tf.reduce_sum(
            common.cw_margin(logits, labels, kappa, target_or_none) +
            tau * smooth)  # tau: [B], per image
      grad = tape.gradient(objective, s["flow"])
      # Record the current flow if adversarial and smoother than the best.
      better = tf.logical_and(
          common.is_adversarial(logits, labels, target_or_none),
          smooth < s["best_smooth"])
      best_flow = tf.where(better[:, None, None, None], s["flow"],
                           s["best_flow"])
      best_smooth = tf.where(better, smooth, s["best_smooth"])
      first_success = tf.where(
          tf.logical_and(better, s["first_success"] == steps), s["i"],
          s["first_success"])
      # Adam update.
      t = tf.cast(s["i"] + 1, tf.float32)
      m = beta1 * s["m"] + (1 - beta1) * grad
      v = beta2 * s["v"] + (1 - beta2) * tf.square(grad)
      update = (m / (1 - beta1 ** t)) / (tf.sqrt(v / (1 - beta2 ** t)) +
                                         adam_eps)
      return dict(i=s["i"] + 1, flow=s["flow"] - learning_rate * update, m=m,
                  v=v, best_flow=best_flow, best_smooth=best_smooth,
                  first_success=first_success)

    state = tf.while_loop(lambda s: s["i"] < steps, lambda s: (step(s),),
                          (state,))[0]
    # Images that never succeeded keep the last flow.
    found = tf.math.is_finite(state["best_smooth"])
    flow = tf.where(found[:, None, None, None], state["best_flow"],
                    state["flow"])
    adv = common.deform(images, flow)
    logits = common.logits_of(model, adv)
    return dict(adv_images=adv, flow=flow,
                success=common.is_adversarial(logits, labels, target_or_none),
                iterations=state["first_success"], t_norm=common.t_norm(flow),
                adv_logits=logits)

  def attack(images, labels, target, taus):
    best = one_round(images, labels, target, taus)
    if search_steps == 1:
      return best

    def next_round(round_index, taus, best):
      # The images still correct are optimized again from zero, tau / 10;
      # only their results are taken (the others keep theirs).
      taus = tf.where(best["success"], taus, taus / 10.0)
      retry = tf.logical_not(best["success"])
      if active_sets:
        index = common.active_indices(retry)
        out = one_round(*(tf.gather(t, index) for t in (images, labels,
                                                        target, taus)))
        out["iterations"] += round_index * steps
        best = {k: common.scatter(best[k], index, v) for k, v in out.items()}
        return round_index + 1, taus, best
      out = one_round(images, labels, target, taus)
      out["iterations"] += round_index * steps
      best = {k: tf.where(tf.reshape(retry, [-1] + [1] * (v.shape.rank - 1)),
                          v, best[k]) for k, v in out.items()}
      return round_index + 1, taus, best

    # Stops early once every image is adversarial (no wasted rounds).
    _, _, best = tf.while_loop(
        lambda round_index, _, best: tf.logical_and(
            round_index < search_steps,
            tf.logical_not(tf.reduce_all(best["success"]))),
        next_round, (tf.constant(1), taus, best))
    return best

  return attack


INFO = common.AttackInfo(stadv, kind="minimal", trains=True)
