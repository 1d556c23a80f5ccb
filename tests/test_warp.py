"""dense_image_warp: tfa forward values, fixed zero-flow gradient, 2nd order."""

import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import warp
from conftest import load_npz


def _warp_value_and_grads(image, flow, cotangent):
  image, flow = tf.constant(image), tf.constant(flow)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([image, flow])
    out = fgr_tf.dense_image_warp(image, flow)
    scalar = tf.reduce_sum(out * cotangent)
  grad_image, grad_flow = tape.gradient(scalar, [image, flow])
  return out.numpy(), grad_image.numpy(), grad_flow.numpy()


@pytest.mark.parametrize("case", range(4))
def test_matches_tfa_outputs_and_gradients(case):
  ref = load_npz("tfa_warp.npz")
  get = lambda key: ref[f"{case}/{key}"]
  out, grad_image, grad_flow = _warp_value_and_grads(
      get("image"), get("flow"), get("cotangent"))
  np.testing.assert_allclose(out, get("output"), rtol=0, atol=1e-6)
  np.testing.assert_allclose(grad_image, get("grad_image"), rtol=0, atol=1e-6)
  np.testing.assert_allclose(grad_flow, get("grad_flow"), rtol=0, atol=1e-6)


def test_zero_flow_is_identity_with_forward_difference_gradient():
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(2, 6, 5, 3))
  cotangent = rng.normal(size=image.shape)
  out, _, grad_flow = _warp_value_and_grads(
      image, np.zeros((2, 6, 5, 2)), cotangent)
  np.testing.assert_array_equal(out, image)
  # out[y] = bilinear(image, y - dy): d out / d dy = -(image[y+1] - image[y])
  # (forward difference), backward difference on the last row.
  dy = np.diff(image, axis=1)
  dy = np.concatenate([dy, dy[:, -1:]], axis=1)
  dx = np.diff(image, axis=2)
  dx = np.concatenate([dx, dx[:, :, -1:]], axis=2)
  expected = np.stack([-(dy * cotangent).sum(-1), -(dx * cotangent).sum(-1)],
                      axis=-1)
  np.testing.assert_allclose(grad_flow, expected, atol=1e-12)
  assert np.abs(grad_flow[:, :-1]).min() > 0  # tfa's would be 0 here
  jac_dy, jac_dx = warp.zero_flow_jacobian(tf.constant(image))
  np.testing.assert_allclose(jac_dy, -dy, atol=1e-12)
  np.testing.assert_allclose(jac_dx, -dx, atol=1e-12)


def test_second_derivatives_match_finite_differences():
  """d/d(image, flow) of <grad_flow warp, v> vs central differences."""
  rng = np.random.default_rng(1)
  image = tf.constant(rng.uniform(size=(1, 5, 6, 2)))
  flow = tf.constant(rng.uniform(-1.5, 1.5, size=(1, 5, 6, 2)))
  cot = tf.constant(rng.normal(size=(1, 5, 6, 2)))
  probe = tf.constant(rng.normal(size=(1, 5, 6, 2)))

  def first_order(image, flow):
    with tf.GradientTape() as tape:
      tape.watch(flow)
      scalar = tf.reduce_sum(fgr_tf.dense_image_warp(image, flow) * cot)
    return tf.reduce_sum(tape.gradient(scalar, flow) * probe)

  with tf.GradientTape() as tape:
    tape.watch([image, flow])
    value = first_order(image, flow)
  grad_image, grad_flow = tape.gradient(value, [image, flow])
  assert np.abs(grad_image.numpy()).max() > 0.1
  assert np.abs(grad_flow.numpy()).max() > 0.1

  eps = 1e-6
  for wrt, analytic in ((0, grad_image), (1, grad_flow)):
    direction = tf.constant(rng.normal(size=(1, 5, 6, 2)))
    args = [image, flow]
    plus, minus = list(args), list(args)
    plus[wrt] = args[wrt] + eps * direction
    minus[wrt] = args[wrt] - eps * direction
    numeric = (first_order(*plus) - first_order(*minus)) / (2 * eps)
    np.testing.assert_allclose(numeric, tf.reduce_sum(analytic * direction),
                               rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_float32_under_tf_function_and_xla(jit):
  rng = np.random.default_rng(2)
  image = rng.uniform(size=(2, 7, 5, 3))
  flow = rng.uniform(-2, 2, size=(2, 7, 5, 2))
  eager = fgr_tf.dense_image_warp(image, flow).numpy()

  @tf.function(jit_compile=jit)
  def warp_and_grad(image, flow):
    with tf.GradientTape() as tape:
      tape.watch(flow)
      out = fgr_tf.dense_image_warp(image, flow)
      total = tf.reduce_sum(out)
    return out, tape.gradient(total, flow)

  out, grad = warp_and_grad(tf.constant(image, tf.float32),
                            tf.constant(flow, tf.float32))
  assert out.dtype == tf.float32 and grad.dtype == tf.float32
  np.testing.assert_allclose(out, eager, atol=1e-5)
  assert np.isfinite(grad.numpy()).all()


def test_flow_unit_conversions_round_trip_and_scale():
  flow_xy = tf.constant([[[[0.5, -0.25]]]], tf.float64)  # x, y normalized
  pixel = fgr_tf.normalized_to_pixel_flow(flow_xy, height=33, width=9)
  # +0.5 normalized x moves the sampling point by 0.5 * (9-1)/2 = 2 px right,
  # i.e. dx = -2; -0.25 y moves it 0.25 * 16 = 4 px up, i.e. dy = +4.
  np.testing.assert_allclose(pixel.numpy().ravel(), [4.0, -2.0])
  back = fgr_tf.pixel_to_normalized_flow(pixel, height=33, width=9)
  np.testing.assert_allclose(back, flow_xy)


def test_pixel_gradient_to_normalized_is_chain_rule():
  rng = np.random.default_rng(3)
  image = tf.constant(rng.uniform(size=(1, 6, 8, 1)))
  flow_xy = tf.constant(rng.uniform(-0.1, 0.1, size=(1, 6, 8, 2)))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(flow_xy)
    pixel = fgr_tf.normalized_to_pixel_flow(flow_xy, 6, 8)
    tape.watch(pixel)
    scalar = tf.reduce_sum(tf.sin(fgr_tf.dense_image_warp(image, pixel)))
  direct = tape.gradient(scalar, flow_xy)
  converted = fgr_tf.pixel_flow_gradient_to_normalized(
      tape.gradient(scalar, pixel), 6, 8)
  np.testing.assert_allclose(converted, direct, atol=1e-12)


def test_random_deform_is_small_clipped_seeded_and_detached():
  rng = np.random.default_rng(4)
  images = tf.constant(rng.uniform(size=(4, 32, 32, 3)), tf.float32)
  seed = tf.constant([1, 2])
  with tf.GradientTape() as tape:
    tape.watch(images)
    out = fgr_tf.random_deform(images, 0.01, seed)
  assert tape.gradient(out, images) is None
  np.testing.assert_array_equal(out, fgr_tf.random_deform(images, 0.01, seed))
  assert not np.array_equal(out, fgr_tf.random_deform(images, 0.01, [1, 3]))
  assert 0.0 <= out.numpy().min() and out.numpy().max() <= 1.0
  diff = np.abs(out.numpy() - images.numpy())
  # sigma 0.01 normalized = 0.155 px: pixels move, but by a fraction.
  assert 0.005 < diff.mean() < 0.1
  np.testing.assert_array_equal(fgr_tf.random_deform(images, 0.0, seed),
                                images)
