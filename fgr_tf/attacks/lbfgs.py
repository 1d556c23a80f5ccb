"""Batched L-BFGS: one independent minimization per batch element.

Plain TensorFlow ops (no tensorflow-probability, no scipy): the iterations
run in a `tf.while_loop`, so the minimizer works inside a `tf.function`,
under XLA (`jit_compile=True`, fixed shapes) and inside a compiled
training step. Used by `stadv(optimizer="lbfgs")`.

Shapes: the variable `x` is [B, ...] (any rank >= 2: element b is
x[b], e.g. a pixel flow [B, H, W, 2]); values are [B]; gradients are like
`x`. Every reduction is over the non-batch axes, so element b's iterates
depend on element b's function only (the batch shares the loop, not the
arithmetic).

One iteration, per element:

1. Direction d = -H g from the two-loop recursion over the element's
   (s, y) pairs of the last `history` iterations (an iteration whose pair
   was skipped leaves its slot empty: the history is a tuple of tensors
   rotated each iteration, which copies nothing),
   H0 = (s.y / y.y) I of the newest pair kept; with no
   pairs (the start, after a restart), steepest descent scaled to a step
   of length `initial_step` (d = -initial_step g / |g|, scipy's L-BFGS-B
   first step). A direction that is not a descent direction (g.d >= 0, or
   not finite) restarts the element: history cleared, steepest descent.
2. Backtracking (Armijo) line search: trial steps 1, shrink, shrink^2, ...
   up to `max_trials`, the first with f(x + a d) <= f(x) + armijo a g.d
   accepted. Each trial is ONE forward evaluation (`value`) for the whole
   batch at once; the trials stop when every element has accepted one.
   An element whose trials all fail does not move and restarts.
3. One gradient evaluation (`value_and_gradient`) at the accepted point;
   the pair s = x_new - x, y = g_new - g is kept if
   s.y > curvature_eps |s| |y| (else skipped: the inverse Hessian
   estimate stays positive definite).

An element stops (`stalled`) when its gradient is zero or not finite, or
when a steepest-descent line search fails (no step of at least
initial_step * shrink^(max_trials - 1) decreases f: converged to the
precision of its float32 function values, or at a kink); it is then still
evaluated with the others but no longer moves. The loop ends after
`max_iterations` iterations or when every element has stalled.

Cost of an iteration: one gradient (a forward and a backward pass) plus
1 to `max_trials` forward passes of the whole batch (the largest number
any element needed).

`value` and `value_and_gradient` also thread a user `state` (any nest of
tensors with fixed shapes) through every evaluation, in order: e.g. to
record the best point seen, trial points included. They receive the
iteration index (int32 scalar, from 0): evaluations during iteration i
(its trials and its gradient) get i; the first evaluation at x0 gets 0.
"""

import collections

import tensorflow as tf

from fgr_tf import errors

Result = collections.namedtuple(
    "Result", ["x", "value", "gradient", "state", "iterations", "stalled"])
Result.__doc__ = """What `minimize` returns.

Attributes:
  x: [B, ...] the last iterate of each element.
  value: [B] f at `x`.
  gradient: [B, ...] the gradient at `x`.
  state: the user state after the last evaluation.
  iterations: int32 scalar, iterations run (<= max_iterations).
  stalled: [B] bool, the elements that stopped before the end.
"""


def _dot(a, b):
  """[B] per-element inner product of two [B, ...] tensors."""
  return tf.reduce_sum(a * b, axis=list(range(1, a.shape.rank)))


def _per_element(values, like):
  """[B] (or [m, B]) values reshaped to broadcast against [B, ...] (or
  [m, B, ...]) `like`."""
  return tf.reshape(values, tf.concat(
      [tf.shape(values), tf.ones([like.shape.rank - values.shape.rank],
                                 tf.int32)], 0))


def direction(gradient, s_history, y_history, rho, gamma, initial_step):
  """The two-loop recursion, vectorized over the batch.

  Args:
    gradient: [B, ...] g at the current iterates.
    s_history, y_history: m tensors [B, ...] each, the pairs, oldest
      first.
    rho: [m, B] 1 / s.y of each pair, 0 for an empty slot (an empty slot
      then contributes nothing, whatever its s and y).
    gamma: [B] s.y / y.y of the newest pair kept (H0 = gamma I), 0 for
      none: then a steepest-descent direction of length `initial_step`.
    initial_step: that length.

  Returns:
    [B, ...] d = -H g.
  """
  m = len(s_history)
  q = gradient
  alphas = [None] * m
  for j in reversed(range(m)):
    alphas[j] = rho[j] * _dot(s_history[j], q)
    q -= _per_element(alphas[j], q) * y_history[j]
  gamma = tf.where(gamma > 0, gamma, tf.math.divide_no_nan(
      initial_step, tf.sqrt(_dot(gradient, gradient))))
  r = _per_element(gamma, q) * q
  for j in range(m):
    beta = rho[j] * _dot(y_history[j], r)
    r += _per_element(alphas[j] - beta, r) * s_history[j]
  return -r


def _steepest(gradient, initial_step):
  """[B, ...] -initial_step g / |g| (0 where g = 0)."""
  norm = tf.sqrt(_dot(gradient, gradient))
  return -_per_element(tf.math.divide_no_nan(initial_step, norm),
                       gradient) * gradient


def check_settings(max_iterations, history, max_trials, shrink,
                   initial_step, armijo):
  """Raises `errors.UserError` naming the first bad setting."""
  for name, value in (("max_iterations", max_iterations),
                      ("history", history), ("max_trials", max_trials)):
    if int(value) != value or value < 1:
      raise errors.UserError(f"{name} must be an int >= 1. Received: "
                             f"{name}={value}")
  if not 0 < shrink < 1:
    raise errors.UserError(f"shrink must be in (0, 1). Received: "
                           f"shrink={shrink}")
  if not initial_step > 0:
    raise errors.UserError(f"initial_step must be > 0. Received: "
                           f"initial_step={initial_step}")
  if not 0 < armijo < 1:
    raise errors.UserError(f"armijo must be in (0, 1). Received: "
                           f"armijo={armijo}")


def minimize(value_and_gradient, value, x0, max_iterations, state=(),
             history=10, max_trials=10, shrink=0.5, initial_step=1.0,
             armijo=1e-4, curvature_eps=1e-6):
  """Minimizes B independent functions with L-BFGS (see the module doc).

  Args:
    value_and_gradient: `(x, state, iteration) -> (f [B], g [B, ...],
      state)`, f of each element and its gradient with respect to x[b].
    value: `(x, state, iteration) -> (f [B], state)`, the same f without
      the gradient (the line-search trials).
    x0: [B, ...] float32 starting points (static rank).
    max_iterations: int >= 1, the most iterations (each: one gradient and
      1 to `max_trials` forward evaluations).
    state: the user state threaded through the evaluations (a nest of
      tensors whose shapes do not change).
    history: m, the (s, y) pairs kept per element.
    max_trials: line-search trials per iteration.
    shrink: factor between trial steps, in (0, 1).
    initial_step: length (in the units of x, Euclidean over an element)
      of a steepest-descent step: the first, and after a restart.
    armijo: sufficient-decrease constant c1 in (0, 1).
    curvature_eps: a pair is kept if s.y > curvature_eps |s| |y|.

  Returns:
    `Result`.
  """
  check_settings(max_iterations, history, max_trials, shrink, initial_step,
                 armijo)
  x0 = tf.convert_to_tensor(x0, tf.float32)
  if x0.shape.rank is None or x0.shape.rank < 2:
    raise errors.UserError(f"x0 must have a batch axis and at least one "
                           f"more (static rank). Received: shape {x0.shape}")
  max_iterations, history = int(max_iterations), int(history)
  max_trials = int(max_trials)
  zero = tf.constant(0)
  f0, g0, state = value_and_gradient(x0, state, zero)
  batch = tf.shape(x0)[0]
  # The history: the pairs of the last `history` iterations, as a tuple
  # rotated each iteration (no copies); a pair skipped, or cleared by a
  # restart, has rho = 0.
  pairs = (tf.zeros_like(x0),) * history
  loop = dict(
      i=zero, x=x0, f=f0, g=g0, state=state, s=pairs, y=pairs,
      rho=tf.zeros(tf.stack([history, batch])), gamma=tf.zeros_like(f0),
      stalled=tf.logical_not(_usable(f0, g0)))

  def iteration(v):
    i, x, f, g = v["i"], v["x"], v["f"], v["g"]
    has_pairs = tf.reduce_any(v["rho"] > 0, axis=0)
    d = direction(g, v["s"], v["y"], v["rho"], v["gamma"], initial_step)
    gd = _dot(g, d)
    restart = tf.logical_and(
        has_pairs, tf.logical_not(tf.logical_and(gd < 0,
                                                 tf.math.is_finite(gd))))
    d = tf.where(_per_element(restart, d), _steepest(g, initial_step), d)
    d = tf.where(_per_element(v["stalled"], d), tf.zeros_like(d), d)
    gd = _dot(g, d)
    used_steepest = tf.logical_or(tf.logical_not(has_pairs), restart)

    def trial(k, step, accepted, state):
      f_trial, state = value(x + _per_element(step, x) * d, state, i)
      ok = tf.logical_and(f_trial <= f + armijo * step * gd,
                          tf.math.is_finite(f_trial))
      accepted = tf.logical_or(accepted, ok)
      step = tf.where(accepted, step, step * shrink)
      return k + 1, step, accepted, state

    _, step, accepted, state = tf.while_loop(
        lambda k, step, accepted, state: tf.logical_and(
            k < max_trials, tf.logical_not(tf.reduce_all(accepted))),
        trial, (zero, tf.ones_like(f), v["stalled"], v["state"]))
    moved = tf.logical_and(accepted, tf.logical_not(v["stalled"]))
    step = tf.where(moved, step, tf.zeros_like(step))
    x_new = x + _per_element(step, x) * d
    f_new, g_new, state = value_and_gradient(x_new, state, i)
    s, y = x_new - x, g_new - g
    sy, yy = _dot(s, y), _dot(y, y)
    keep = tf.logical_and(moved, sy > curvature_eps * tf.sqrt(_dot(s, s) *
                                                              yy))
    failed = tf.logical_and(tf.logical_not(accepted),
                            tf.logical_not(v["stalled"]))
    # Restarted or failed: the element's pairs cleared (rho = 0); then the
    # new pair, or an empty slot, enters as the newest.
    clear = tf.logical_or(restart, failed)
    keep_x = _per_element(keep, x)
    rho = tf.where(clear[None], tf.zeros_like(v["rho"]), v["rho"])
    rho = tf.concat([rho[1:], tf.where(
        keep, tf.math.divide_no_nan(1.0, sy), tf.zeros_like(sy))[None]], 0)
    s_hist = v["s"][1:] + (tf.where(keep_x, s, tf.zeros_like(s)),)
    y_hist = v["y"][1:] + (tf.where(keep_x, y, tf.zeros_like(y)),)
    gamma = tf.where(keep, tf.math.divide_no_nan(sy, yy),
                     tf.where(clear, tf.zeros_like(sy), v["gamma"]))
    stalled = tf.logical_or(
        v["stalled"], tf.logical_or(tf.logical_and(failed, used_steepest),
                                    tf.logical_not(_usable(f_new, g_new))))
    return dict(i=i + 1, x=x_new, f=f_new, g=g_new, state=state, s=s_hist,
                y=y_hist, rho=rho, gamma=gamma, stalled=stalled)

  out = tf.while_loop(
      lambda v: tf.logical_and(v["i"] < max_iterations,
                               tf.logical_not(tf.reduce_all(v["stalled"]))),
      lambda v: (iteration(v),), (loop,))[0]
  return Result(x=out["x"], value=out["f"], gradient=out["g"],
                state=out["state"], iterations=out["i"],
                stalled=out["stalled"])


def _usable(f, g):
  """[B] f finite and g finite and nonzero: the element can move."""
  gg = _dot(g, g)
  return tf.logical_and(tf.math.is_finite(f),
                        tf.logical_and(tf.math.is_finite(gg), gg > 0))
