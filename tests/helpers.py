"""Tiny models and data for fast tests; running the bin/ apps; float32
tolerances."""

import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np

import fgr_tf

ROOT = pathlib.Path(__file__).resolve().parents[1]

# float32 unit roundoff: a rounded float32 x has |fl(x) - x| <= U32 * |x|.
U32 = 2.0 ** -24
# bfloat16's (8 significant bits), for the mixed_bfloat16 policy.
UBF16 = 2.0 ** -8

# Safety factor of `assert_close_float32`, derived in its docstring.
FLOAT32_FACTOR = 10.0


def float32_tolerance(scale, reduction, depth=1, factor=FLOAT32_FACTOR,
                      unit_roundoff=U32):
  """factor * u * sqrt(reduction) * depth * scale: the round-off two float32
  computations of one value may differ by (see `assert_close_float32`)."""
  return factor * unit_roundoff * math.sqrt(reduction) * depth * scale


def assert_close_float32(actual, expected, reduction, depth=1,
                         factor=FLOAT32_FACTOR, scale=None, err_msg="",
                         unit_roundoff=U32):
  """Asserts max|actual - expected| <= factor * u * sqrt(reduction) * depth
  * scale, for values computed in float32 on at least one side.

  u = 2**-24, the float32 unit roundoff. `reduction`: the number of terms
  of the longest sum that produced the values (a conv: kh * kw * c_in
  forward, batch * h * w for its kernel gradient; a dense layer: its input
  size; BatchNorm: batch * h * w). `depth`: the number of such reductions
  chained one after the other (layers crossed forward and backward, steps
  of an optimizer). `scale`: max|expected| unless given; give the magnitude
  of the summed terms instead when the result is smaller than them because
  they cancel (e.g. a gradient that is zero in exact arithmetic).

  Why sqrt(reduction): a float32 sum of n terms commits n roundings of
  relative size <= u. Their worst case adds up to n * u (Wilkinson), which
  is far too loose to catch bugs: 512 terms crossed 6 times allow 1.8e-4
  relative, plus the margin any worst-case test needs. Roundings behave as
  independent zero-mean errors (Higham and Mary, SIAM J. Sci. Comput. 2019,
  "A new approach to probabilistic rounding error analysis"), so they grow
  like a random walk: the error of a sum of n terms, relative to the
  magnitude of its partial sums, has a standard deviation of about
  u * sqrt(n) / 2.4 (uniform roundings, variance u^2 / 3, partial sums as
  large as the result, same-sign or random-sign terms alike); blocked or
  pairwise summation (oneDNN, Eigen) only makes it smaller.

  Why factor 10: two float32 computations that sum in different orders
  (AVX2 vs AVX-512 kernels, one device vs two replicas) each carry that
  error: sqrt(2) times it, about 0.6 u sqrt(n). The largest of up to ~1e5
  compared elements is at most ~4.5 standard deviations: 2.7 u sqrt(n).
  `depth` counts chained reductions linearly (their independent errors
  would add as sqrt(depth)) and the scale is the largest |value|, not each
  element's own. 10 leaves a margin of ~3.7 over that estimate, and stays
  two orders of magnitude below the 1e-3 relative changes that a wrong
  formula, a missing 1/B or a wrong batch statistic cause.

  Exact results keep exact assertions (assert_array_equal), and float64 on
  both sides keeps float64 tolerances: this helper is for float32 round-off
  (unit_roundoff=UBF16 for bfloat16 roundings).
  Set FGR_TOLERANCE_LOG=<file> to append each comparison's error, bound
  and ratio to <file> (to see the margins on another CPU).
  """
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    raise AssertionError(f"shapes differ: {actual.shape} != {expected.shape}"
                         f" {err_msg}")
  if scale is None:
    scale = float(np.abs(expected).max()) if expected.size else 0.0
  bound = float32_tolerance(scale, reduction, depth, factor, unit_roundoff)
  diff = np.abs(actual - expected)
  error = float(diff.max()) if diff.size else 0.0
  ratio = error / bound if bound else math.inf
  log = os.environ.get("FGR_TOLERANCE_LOG")
  if log:
    with open(log, "a", encoding="utf-8") as f:
      f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{err_msg}\t"
              f"{error:.3e}\t{bound:.3e}\t{ratio:.3f}\n")
  if not error <= bound:  # also fails on NaN
    detail = ""
    if diff.size:
      bad = np.isnan(diff)
      flat = int(np.argmax(bad)) if bad.any() else int(np.argmax(diff))
      where = np.unravel_index(flat, diff.shape)
      detail = (f" at {tuple(int(i) for i in where)} (actual "
                f"{actual[where]:.9g}, expected {expected[where]:.9g})")
    raise AssertionError(
        f"max|actual - expected| = {error:.3e}{detail} > bound {bound:.3e}"
        f" = factor {factor} * u {unit_roundoff:.3e} * sqrt(reduction"
        f" {reduction})"
        f" {math.sqrt(reduction):.3g} * depth {depth} * scale {scale:.3e}"
        f" (error / bound = {ratio:.2f}) {err_msg}".rstrip())


def assert_weights_close(actual, expected, initial, reduction, depth,
                         zero_gradient=None, err_msg=""):
  """Weights after float32 training steps, tensor by tensor, each to
  `assert_close_float32` with scale max(|expected|, |expected - initial|):
  the round-off of the final values and of the summed updates.
  zero_gradient: {index: index of another tensor} for a tensor whose
  gradient is zero in exact arithmetic (a conv bias before BatchNorm): its
  float32 value is round-off of the same sums as the other tensor's
  gradient (the kernel's), so it takes that tensor's scale."""
  assert len(actual) == len(expected) == len(initial)
  scales = [max(float(np.abs(b).max()), float(np.abs(b - w).max()))
            for b, w in zip(expected, initial)]
  for index, other in (zero_gradient or {}).items():
    scales[index] = scales[other]
  for index, (a, b) in enumerate(zip(actual, expected)):
    assert_close_float32(a, b, reduction, depth, scale=scales[index],
                         err_msg=f"{err_msg} weight {index} {b.shape}")


# fit_fgr_on_one_batch on tiny_data(n=8) and tiny_backbone: the longest
# float32 sum has batch * h * w = 8 * 8 * 8 = 512 terms (BatchNorm's
# statistics, the conv kernel's gradient); each of the 2 steps crosses the
# 3 layers (conv, BatchNorm, dense) 3 times: forward, the input gradient,
# its derivative w.r.t. the weights.
FIT_REDUCTION = 8 * 8 * 8
FIT_DEPTH = 2 * 3 * 3
# tiny_backbone's weights with BatchNorm: conv0's bias (1) is followed by
# BatchNorm, its gradient is zero but for round-off; the kernel is 0.
TINY_BN_ZERO_GRADIENT = {1: 0}


def assert_fits_close(weights, logs, expected_weights, expected_logs,
                      initial, batch_norm, keys):
  """Two float32 `fit_fgr_on_one_batch` runs that sum in different orders
  (replicas vs one device, AVX2 vs AVX-512) agree up to round-off: weights
  and the logs named in `keys`."""
  assert_weights_close(weights, expected_weights, initial, FIT_REDUCTION,
                       FIT_DEPTH,
                       TINY_BN_ZERO_GRADIENT if batch_norm else None)
  for key in keys:
    assert_close_float32(logs[key], expected_logs[key], FIT_REDUCTION,
                         FIT_DEPTH, err_msg=key)


def run_app(name, *args, check=True, timeout=300):
  """Runs `python bin/<name>.py *args` from the repository root; returns the
  CompletedProcess (text stdout/stderr). check: raise unless exit code 0."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, str(ROOT / "bin" / f"{name}.py"),
                         *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
  return proc


def tiny_data(n=8, size=8, channels=2, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n, size, size, channels)).astype(np.float32)
  labels = rng.integers(0, classes, size=n).astype(np.int32)
  return images, labels


def tiny_backbone(size=8, channels=2, classes=3, batch_norm=True,
                  sync_batchnorm=False, seed=0, dtype=None):
  """conv-(BN)-relu-pool-dense; small enough for per-test compilation."""
  keras.utils.set_random_seed(seed)
  factory = fgr_tf.backbones.layers.LayerFactory(dtype,
                                              sync_batchnorm=sync_batchnorm)
  inputs = keras.Input((size, size, channels))
  x = factory.conv(4, "conv0")(inputs)
  if batch_norm:
    x = factory.batch_norm("bn0")(x)
  x = factory.relu()(x)
  x = factory.max_pool()(x)
  x = keras.layers.Flatten(dtype=dtype)(x)
  return keras.Model(inputs, factory.dense(classes, "dense")(x))


def no_bn_model(dtype="float64"):
  """A float64 classifier of 8x8x2 images into 3 classes WITHOUT BatchNorm
  (conv-relu-pool-dense): its samples are independent in any mode."""
  return tiny_backbone(batch_norm=False, dtype=dtype)


def copy_of(model):
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  return clone


def fit_fgr_on_one_batch(strategy, batch_norm, sync_batchnorm, images,
                         labels, initial_weights, epochs=2):
  """The tiny FGR + IGR model (no random start) built in `strategy`'s scope,
  fit for `epochs` steps on one global batch; (backbone weights, logs)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    backbone = tiny_backbone(batch_norm=batch_norm,
                             sync_batchnorm=sync_batchnorm)
    backbone.set_weights(initial_weights)
    model = fgr_tf.FGRModel(backbone, fgr_lambda=300.0, rs_sigma=0.0,
                            igr_lambda=5.0)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  metrics=["accuracy"])
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
      len(images))
  logs = model.fit(dataset, epochs=epochs, shuffle=False, verbose=0).history
  return model.backbone.get_weights(), logs
