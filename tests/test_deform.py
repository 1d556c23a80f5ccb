"""`attacks.common.deform` by XLA (in attacks compiled on a fixed batch)
against its TF ops: values, image and flow gradients, second derivatives
and pfor jacobians agree to float32 round-off, on both paddings; and each
context takes the path it should."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import warp
from fgr_tf.attacks import common
from helpers import assert_close_float32

SIZE, CHANNELS = 12, 3


@pytest.fixture(scope="module")
def model():
  return fgr_tf.backbones.build("small_cnn", 10, (SIZE, SIZE, CHANNELS))


def _case(seed, batch=5):
  """Images in [0, 1], flows from sub-pixel to beyond the border (px)."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, SIZE, SIZE, CHANNELS))
  scale = np.array([0.3, 1.0, 3.0, 8.0, 20.0])[:batch, None, None, None]
  flow = rng.normal(size=(batch, SIZE, SIZE, 2)) * scale
  cotangent = rng.normal(size=(batch, SIZE, SIZE, CHANNELS))
  direction = rng.normal(size=(batch, SIZE, SIZE, 2))
  return [tf.constant(a, tf.float32)
          for a in (images, flow, cotangent, direction)]


def _context(model, setting):
  if setting == "ops":
    return contextlib.nullcontext()
  return common.weights_read_once(model, varying_batch=setting == "varying")


def _derivatives(model, setting, padding, images, flow, cotangent,
                 direction, normalized=False):
  """deform, d/d images and d/d flow of <cotangent, deform>, and the
  flow-flow second derivative applied to `direction`."""

  @tf.function
  def run(images, flow):
    with _context(model, setting):
      with tf.GradientTape() as outer:
        outer.watch(flow)
        with tf.GradientTape() as tape:
          tape.watch([images, flow])
          deformed = common.deform(warp.prepare_image(images, padding),
                                   flow, normalized=normalized)
          total = tf.reduce_sum(deformed * cotangent)
        d_images, d_flow = tape.gradient(total, [images, flow])
        along = tf.reduce_sum(d_flow * direction)
      return deformed, d_images, d_flow, outer.gradient(along, flow)

  return [t.numpy() for t in run(images, flow)]


@pytest.mark.parametrize("padding,normalized", [
    ("edge", False), ("zeros", False), ("edge", True)])
def test_xla_deform_equals_ops_to_round_off(model, padding, normalized):
  images, flow, cotangent, direction = _case(0)
  if normalized:  # flow-PGD's: normalized (x, y) flows, here up to ~3 px
    flow = flow / SIZE
  case = images, flow, cotangent, direction, normalized
  by_ops = _derivatives(model, "ops", padding, *case)
  by_xla = _derivatives(model, "fixed", padding, *case)
  # deform: an interpolation of 4 values (depth 2: the corner weights);
  # its gradients sum over the 4 corners and the channels.
  names = ("deform", "d images", "d flow", "second derivative")
  reductions = (4, 4, 4 * CHANNELS, 4 * CHANNELS)
  for name, reduction, xla, ops in zip(names, reductions, by_xla, by_ops):
    assert np.abs(ops).max() > 0, name
    assert_close_float32(xla, ops, reduction, depth=2, err_msg=name)


def test_varying_batch_and_no_context_keep_the_ops(model, monkeypatch):
  calls = []
  xla = common._deform_ops_by_xla
  monkeypatch.setattr(common, "_deform_ops_by_xla",
                      lambda *args: calls.append(1) or xla(*args))
  case = _case(1)
  by_ops = _derivatives(model, "ops", "edge", *case)
  assert not calls
  varying = _derivatives(model, "varying", "edge", *case)
  assert not calls
  for got, expected in zip(varying, by_ops):
    np.testing.assert_array_equal(got, expected)
  _derivatives(model, "fixed", "edge", *case)
  assert calls
  calls.clear()
  monkeypatch.setattr(common, "DEFORM_BY_XLA", False)
  fixed_off = _derivatives(model, "fixed", "edge", *case)
  assert not calls
  for got, expected in zip(fixed_off, by_ops):
    np.testing.assert_array_equal(got, expected)


def test_jacobian_under_pfor_equals_the_ops(model):
  """ADef's form: a jacobian of per-image sums w.r.t. the flow (pfor; the
  gradient is TF's ops there)."""
  images, flow, cotangent, _ = _case(2)

  def jacobian(setting):
    @tf.function
    def run(flow):
      with _context(model, setting):
        with tf.GradientTape() as tape:
          tape.watch(flow)
          deformed = common.deform(warp.prepare_image(images), flow)
          sums = tf.reduce_sum(deformed * cotangent, axis=[1, 2, 3])
        return tape.jacobian(sums, flow)
    return run(flow).numpy()

  expected = jacobian("ops")
  assert np.abs(expected).max() > 0
  assert_close_float32(jacobian("fixed"), expected, 4 * CHANNELS, depth=2)
