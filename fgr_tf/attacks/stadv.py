"""stAdv (Xiao et al., ICLR 2018): spatially transformed adversarial examples."""

import tensorflow as tf

from fgr_tf import environment
from fgr_tf import errors
from fgr_tf import warp
from fgr_tf.attacks import common
from fgr_tf.attacks import lbfgs as lbfgs_lib


def _smoothness(flow, eps):
  """`flow_smoothness` as TF ops (see there)."""
  height, width = tf.shape(flow)[1], tf.shape(flow)[2]

  def pair_sum(axis):
    size = tf.shape(flow)[axis]
    _, rest = tf.split(flow, tf.stack([1, size - 1]), axis=axis)
    head, _ = tf.split(flow, tf.stack([size - 1, 1]), axis=axis)
    return tf.reduce_sum(
        tf.sqrt(tf.reduce_sum(tf.square(rest - head), -1) + eps), axis=[1, 2])

  border = tf.cast(2 * (height + width), flow.dtype) * tf.sqrt(
      tf.cast(eps, flow.dtype))
  return 2.0 * (pair_sum(1) + pair_sum(2)) + border


@tf.function(jit_compile=True)
def _smoothness_by_xla(flow, eps):
  return _smoothness(flow, eps)


@tf.function(jit_compile=True)
def _smoothness_vjp_by_xla(flow, eps, upstream):
  """d/d flow of sum_b upstream[b] * L_flow[b], TF's autodiff compiled."""
  with tf.GradientTape() as tape:
    tape.watch(flow)
    total = tf.reduce_sum(upstream * _smoothness(flow, eps))
  return tape.gradient(total, flow)


# Whether `flow_smoothness` runs as XLA computations (the value, and its
# gradient: TF's ~20 small ops per step on [B, H, W, 2], ~9% of stAdv's
# time on the quickstart CNN). FGR_TF_STADV_SMOOTHNESS=ops: TF ops.
SMOOTHNESS_BY_XLA = environment.choice("FGR_TF_STADV_SMOOTHNESS", "xla",
                                       ("xla", "ops")) == "xla"


def flow_smoothness(flow, eps=1e-8):
  """stAdv's L_flow per image [B]: sum_p sum_{q in N(p)} sqrt(|du|^2+|dv|^2+eps).

  N(p) are the 4-neighbours; the flow is edge-padded (the border pixel is
  its own neighbour, contributing sqrt(eps)). Flow in pixels [B, H, W, 2].

  Computed as the equal sum over neighbouring pairs: each pair (p, q)
  appears twice (q in N(p) and p in N(q)), and each border pixel adds
  sqrt(eps) once per side it lies on, 2 (H + W) terms per image. The pairs
  come from `tf.split`, whose gradient is one concatenation; slices of the
  padded flow cost a StridedSliceGrad each (TF's slow strided copy: the
  gradient took 16.8 against 4.4 ms on [250, 28, 28, 2]). The value and
  its gradient each run as one XLA computation (`SMOOTHNESS_BY_XLA`; the
  gradient is differentiable again).
  """
  flow = tf.convert_to_tensor(flow)
  if not SMOOTHNESS_BY_XLA:
    return _smoothness(flow, eps)
  eps = tf.constant(eps, flow.dtype)

  @tf.custom_gradient
  def smoothness(flow):
    def grad(upstream):
      return _smoothness_vjp_by_xla(flow, eps, upstream)
    return _smoothness_by_xla(flow, eps), grad

  return smoothness(flow)


OPTIMIZERS = ("adam", "lbfgs")

# L-BFGS settings of `stadv(optimizer="lbfgs")` (`lbfgs.minimize`): the
# last 10 pairs, up to 10 trial steps halving from 1 (an iteration moves
# at least 2^-9 of the quasi-Newton step), and a first (or restarted)
# step of 1 px, Euclidean over the whole flow (scipy L-BFGS-B's first
# step: 1 / |g| times the gradient).
LBFGS_SETTINGS = dict(history=10, max_trials=10, shrink=0.5,
                      initial_step=1.0)


def stadv(model, images, labels, tau=0.05, kappa=0.0, steps=200,
          learning_rate=0.05, search_steps=3, target=None,
          optimizer="adam", jit_compile="auto"):
  """stAdv: minimize margin(x_f) + tau * L_flow(f) over a pixel flow f.

  The whole batch is optimized at once (each image's objective is its
  own) and, per image, the successful flow with the smallest L_flow seen
  is kept. As C&W and advertorch do with their constant, images that no
  step made adversarial are optimized again from zero with tau / 10, up to
  `search_steps` rounds in all: with tau = 0.05 the smoothness term alone
  wins for about 40% of the images of a briefly trained Fashion-MNIST CNN.

  Two optimizers: "adam" (the default), a fixed number of `steps` of Adam;
  "lbfgs", the paper's, a batched L-BFGS (`fgr_tf.attacks.lbfgs`: per-image
  history of 10 pairs, backtracking line search), up to `steps`
  iterations, each one gradient plus 1-10 forward passes (the line
  search), stopping early once every image has converged. Adam stays the
  default: on the quickstart's two models (docs/ATTACK_REFERENCES.md,
  "stAdv: Adam or L-BFGS") L-BFGS fooled fewer images (98.5% vs 100%)
  with less smooth flows (mean L_flow 8-30% larger on the images both
  fooled), although with smaller median T-norms; tau = 0.05 mostly
  leaves its line search at the zero flow (L_flow's kink).

  Args:
    model: maps [B, H, W, C] images to logits; run with training=False.
    images: [B, H, W, C] floats in [0, 1].
    labels: [B] int true labels.
    tau: weight of the smoothness loss L_flow (0.05 as in the paper).
    kappa: confidence margin of the C&W loss, >= 0.
    steps: per search round, Adam steps or L-BFGS iterations (at most).
    learning_rate: Adam's step size, in pixels (Adam only).
    search_steps: rounds in all, each with tau / 10 for the images not yet
      adversarial (1 = a single run with `tau`); the rounds stop early
      when every image is adversarial. Works inside a tf.function.
    target: optional [B] int target classes (targeted attack).
    optimizer: "adam" or "lbfgs".
    jit_compile: compile with XLA; "auto" = on GPU/TPU.

  Returns:
    `AttackResult`; `iterations` counts the Adam steps or L-BFGS iterations
    (over all search rounds) completed before the image was first
    adversarial (all `steps` of each round it took if never).
  """
  images, labels = common.check_inputs(images, labels, "stadv", model)
  if not tau >= 0 or not kappa >= 0:
    raise errors.UserError(f"tau and kappa must be >= 0. Received: tau={tau}, "
                           f"kappa={kappa}")
  for name, value in (("steps", steps), ("search_steps", search_steps)):
    if int(value) != value or value < 1:
      raise errors.UserError(f"{name} must be an int >= 1. Received: "
                             f"{name}={value}")
  if optimizer not in OPTIMIZERS:
    raise errors.UserError(f"Unknown stadv optimizer {optimizer!r}. Expected "
                           f"one of {OPTIMIZERS}.")
  targeted = target is not None
  target = tf.cast(labels if target is None else target, tf.int32)
  active_sets = common.use_active_sets(jit_compile)
  key = ("stadv", float(kappa), int(steps), float(learning_rate), targeted,
         int(search_steps), optimizer, active_sets)
  attack = common.compiled(model, key, lambda: _build(
      model, float(kappa), int(steps), float(learning_rate), targeted,
      int(search_steps), optimizer, active_sets), jit_compile)
  taus = tf.fill([tf.shape(images)[0]], float(tau))
  return common.AttackResult(**attack(images, labels, target, taus))


def _build(model, kappa, steps, learning_rate, targeted, search_steps,
           optimizer, active_sets):
  """The attack, all search rounds in one graph (it also runs inside a
  compiled training step, where a Python `if` on a tensor cannot).
  `active_sets`: rounds after the first run on the images still not
  adversarial only (gathered, then scattered back); else on the whole
  batch, their results kept for those images only (fixed shapes, for XLA).
  Same result either way: each image's optimization is its own."""
  beta1, beta2, adam_eps = 0.9, 0.999, 1e-8

  def evaluate(flow, images, labels, target, tau):
    """[B] objective, [B] L_flow and logits of the flows [B, H, W, 2];
    `images` prepared (`warp.prepare_image`)."""
    logits = common.logits_of(model, common.deform(images, flow))
    smooth = flow_smoothness(flow)
    margin = common.cw_margin(logits, labels, kappa,
                              target if targeted else None)
    return margin + tau * smooth, smooth, logits

  def record(best, flow, smooth, logits, labels, target, i):
    """`best` (best_flow, best_smooth, first_success) with `flow` where it
    is adversarial and smoother than the best so far (label: step i)."""
    best_flow, best_smooth, first_success = best
    better = tf.logical_and(
        common.is_adversarial(logits, labels, target if targeted else None),
        smooth < best_smooth)
    return (common.where_per_image(better, flow, best_flow),
            tf.where(better, smooth, best_smooth),
            tf.where(tf.logical_and(better, first_success == steps), i,
                     first_success))

  def value_and_gradient(images, labels, target, tau, flow, best, i):
    """Per-image objective [B], its gradient w.r.t. the flow, and `best`
    updated with this flow if it is adversarial and smoother."""
    with tf.GradientTape() as tape:
      tape.watch(flow)
      objective, smooth, logits = evaluate(flow, images, labels, target, tau)
      total = tf.reduce_sum(objective)  # inside the tape
    grad = tape.gradient(total, flow)
    return objective, grad, record(best, flow, smooth, logits, labels,
                                   target, i)

  def adam(images, labels, target, tau, flow, best):
    """Adam: `steps` steps; returns (last flow, best)."""

    def step(i, flow, m, v, best):
      _, grad, best = value_and_gradient(images, labels, target, tau, flow,
                                         best, i)
      t = tf.cast(i + 1, tf.float32)
      m = beta1 * m + (1 - beta1) * grad
      v = beta2 * v + (1 - beta2) * tf.square(grad)
      update = (m / (1 - beta1 ** t)) / (tf.sqrt(v / (1 - beta2 ** t)) +
                                         adam_eps)
      return i + 1, flow - learning_rate * update, m, v, best

    _, flow, _, _, best = tf.while_loop(
        lambda i, *_: i < steps, step,
        (tf.constant(0), flow, tf.zeros_like(flow), tf.zeros_like(flow),
         best))
    return flow, best

  def lbfgs(images, labels, target, tau, flow, best):
    """L-BFGS: up to `steps` iterations; every evaluated flow, line-search
    trials included, may become the best; returns (last flow, best)."""

    def value(flow, best, i):
      objective, smooth, logits = evaluate(flow, images, labels, target, tau)
      return objective, record(best, flow, smooth, logits, labels, target,
                               i)

    def value_with_gradient(flow, best, i):
      return value_and_gradient(images, labels, target, tau, flow, best, i)

    result = lbfgs_lib.minimize(value_with_gradient, value, flow, steps,
                                state=best, **LBFGS_SETTINGS)
    return result.x, result.state

  optimize = {"adam": adam, "lbfgs": lbfgs}[optimizer]

  def one_round(images, labels, target, tau):
    shape = tf.shape(images)
    batch = shape[0]
    flow = tf.zeros(tf.stack([batch, shape[1], shape[2], 2]))
    best = (flow, tf.fill([batch], float("inf")), tf.fill([batch], steps))
    # Prepared once for the round's warps (`common.deform`).
    prepared = warp.prepare_image(images)
    flow, (best_flow, best_smooth, first_success) = optimize(
        prepared, labels, target, tau, flow, best)
    # Images that never succeeded keep the last flow.
    found = tf.math.is_finite(best_smooth)
    flow = common.where_per_image(found, best_flow, flow)
    adv = common.deform(prepared, flow)
    logits = common.logits_of(model, adv)
    target_or_none = target if targeted else None
    return dict(adv_images=adv, flow=flow,
                success=common.is_adversarial(logits, labels, target_or_none),
                iterations=first_success, t_norm=common.t_norm(flow),
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
      best = {k: common.where_per_image(retry, v, best[k])
              for k, v in out.items()}
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
