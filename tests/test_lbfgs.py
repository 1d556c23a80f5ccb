"""The batched L-BFGS minimizer (fgr_tf.attacks.lbfgs) and
stadv(optimizer="lbfgs")."""

import importlib

import numpy as np
import pytest
import tensorflow as tf

from fgr_tf import attacks
from fgr_tf import errors
from fgr_tf import synthetic
from helpers import U32, assert_close_float32

lbfgs = importlib.import_module("fgr_tf.attacks.lbfgs")


def _functions(f):
  """`minimize`'s two callables for f: [B, ...] -> [B]; the state counts
  (forward evaluations, gradient evaluations)."""

  def value_and_gradient(x, state, iteration):
    del iteration
    with tf.GradientTape() as tape:
      tape.watch(x)
      values = f(x)
      total = tf.reduce_sum(values)
    return values, tape.gradient(total, x), (state[0], state[1] + 1)

  def value(x, state, iteration):
    del iteration
    return f(x), (state[0] + 1, state[1])

  return value_and_gradient, value


_compiled = {}


def _minimize(f, x0, max_iterations, jit_compile=False):
  """`minimize` compiled once per (f, max_iterations, jit_compile), for
  any batch size (one trace)."""
  key = (f, max_iterations, jit_compile)
  if key not in _compiled:
    value_and_gradient, value = _functions(f)
    _compiled[key] = tf.function(
        lambda x0: lbfgs.minimize(value_and_gradient, value, x0,
                                  max_iterations, state=(0, 0)),
        jit_compile=jit_compile,
        input_signature=[tf.TensorSpec([None] + list(np.shape(x0)[1:]))])
  return _compiled[key](tf.constant(x0, tf.float32))


def _quadratics(batch, n, seed):
  """f_b(x) = 1/2 x^T A_b x - c_b^T x with A_b SPD, eigenvalues in
  [1, 100]; returns (f, A float64 [B, n, n], c float64 [B, n])."""
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.normal(size=(batch, n, n)))[0]
  eigenvalues = np.exp(rng.uniform(0, np.log(100), size=(batch, n)))
  eigenvalues[:, 0], eigenvalues[:, 1] = 1.0, 100.0
  a = np.einsum("bij,bj,bkj->bik", q, eigenvalues, q)
  c = rng.normal(size=(batch, n))
  a32, c32 = tf.constant(a, tf.float32), tf.constant(c, tf.float32)

  def f(x):
    ax = tf.einsum("bij,bj->bi", a32, x)
    return 0.5 * tf.reduce_sum(x * ax, -1) - tf.reduce_sum(c32 * x, -1)

  return f, a, c


def test_minimizes_independent_quadratics():
  f, a, c = _quadratics(6, 16, seed=0)
  result = _minimize(f, np.zeros((6, 16)), 200)
  exact = np.linalg.solve(a, c[..., None])[..., 0]
  # The line search compares float32 values of f, which resolve
  # differences of ~u |f| (terms of size |c| |x|): it stops within
  # |x - x*| ~ sqrt(2 u |f| / lambda_min) of the minimum (lambda_min = 1);
  # 10x that estimate (1e-3 here, |f| terms ~8). Measured: 3.5e-4 (35
  # iterations).
  f_scale = float((np.abs(c) * np.abs(exact)).sum(-1).max())
  bound = 10 * np.sqrt(2 * U32 * f_scale)
  assert np.abs(result.x.numpy() - exact).max() <= bound
  assert result.iterations.numpy() < 200  # all stalled at convergence
  assert result.stalled.numpy().all()
  # Each iteration: one gradient, 1-10 forward trials.
  forwards, gradients = (int(t) for t in result.state)
  assert gradients == result.iterations.numpy() + 1
  assert gradients - 1 <= forwards <= 10 * (gradients - 1)


def _rosenbrock(x):
  """Per element [B, 2]: 100 (x1 - x0^2)^2 + (1 - x0)^2, minimum (1, 1)."""
  return 100.0 * tf.square(x[:, 1] - tf.square(x[:, 0])) + tf.square(
      1.0 - x[:, 0])


@pytest.mark.parametrize("jit_compile", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_minimizes_rosenbrock_and_elements_are_independent(jit_compile):
  x0 = np.random.default_rng(1).uniform(-2, 2, size=(5, 2))
  x0[0] = (-1.2, 1.0)  # the classic start
  batch = _minimize(_rosenbrock, x0, 300, jit_compile=jit_compile)
  # The minimum is well conditioned in x0 along the valley's floor only:
  # f's float32 round-off near f = 0 (terms of size ~1) moves the
  # stopping point by ~sqrt(u / 0.4) (smallest Hessian eigenvalue 0.4):
  # ~4e-4; 10x that. Measured: exact (1, 1), 41-43 iterations.
  np.testing.assert_allclose(batch.x.numpy(), np.ones((5, 2)), rtol=0,
                             atol=4e-3)
  # Each element alone follows the same iterates: the same result.
  for b in (0, 3):
    alone = _minimize(_rosenbrock, x0[b:b + 1], 300, jit_compile=jit_compile)
    assert_close_float32(alone.x.numpy()[0], batch.x.numpy()[b],
                         reduction=2, depth=10)


def test_elements_do_not_depend_on_the_batch():
  """Rosenbrock from 8 starts, 25 iterations: one starts at the minimum
  (stalled at once), one converges before the end (measured), the others
  are still running: each element's iterates are the ones it has alone
  (measured: bitwise equal), however long the others run."""
  x0 = np.random.default_rng(3).uniform(-2, 2, size=(8, 2))
  x0[5] = (1.0, 1.0)  # at the minimum: gradient zero, stalled at once
  batch = _minimize(_rosenbrock, x0, 25)
  for b in range(8):
    alone = _minimize(_rosenbrock, x0[b:b + 1], 25)
    assert_close_float32(alone.x.numpy()[0], batch.x.numpy()[b],
                         reduction=2, depth=10, scale=2.0)
  np.testing.assert_array_equal(batch.x.numpy()[5], [1.0, 1.0])
  stalled = batch.stalled.numpy()
  assert stalled[5] and 1 < stalled.sum() < 8, stalled


def test_bad_settings_are_named():
  value_and_gradient, value = _functions(_rosenbrock)
  for settings, message in ((dict(history=0), "history=0"),
                            (dict(max_trials=2.5), "max_trials=2.5"),
                            (dict(shrink=1.0), "shrink=1.0"),
                            (dict(initial_step=0.0), "initial_step=0.0"),
                            (dict(armijo=0.0), "armijo=0.0")):
    with pytest.raises(errors.UserError, match=message):
      lbfgs.minimize(value_and_gradient, value, np.zeros((1, 2)), 5,
                     state=(0, 0), **settings)
  with pytest.raises(errors.UserError, match="max_iterations=0"):
    lbfgs.minimize(value_and_gradient, value, np.zeros((1, 2)), 0)
  with pytest.raises(errors.UserError, match="static rank"):
    lbfgs.minimize(value_and_gradient, value, np.zeros(2), 5)


def test_stadv_rejects_an_unknown_optimizer():
  images, labels = synthetic.shapes(2, size=12, seed=0)
  import fgr_tf  # pylint: disable=g-import-not-at-top
  model = fgr_tf.backbones.build("small_cnn", 10, (12, 12, 1))
  with pytest.raises(errors.UserError, match="optimizer 'sgd'"):
    attacks.stadv(model, images, labels, optimizer="sgd")
  assert attacks.make("stadv", optimizer="lbfgs").settings["optimizer"] == (
      "lbfgs")
