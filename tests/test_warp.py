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


def _grid_sample_zeros(image, flow):
  """float64 NumPy re-statement of torch's grid_sample(bilinear,
  align_corners=True, padding_mode="zeros") in the pixel-flow convention:
  out[b, y, x] = sum over the 4 pixels around (y - dy, x - dx) that lie in
  the image of weight * pixel (out-of-image corners count as 0)."""
  batch, height, width, channels = image.shape
  out = np.zeros_like(image, dtype=np.float64)
  for b in range(batch):
    for y in range(height):
      for x in range(width):
        qy = y - flow[b, y, x, 0]
        qx = x - flow[b, y, x, 1]
        y0, x0 = int(np.floor(qy)), int(np.floor(qx))
        wy, wx = qy - y0, qx - x0
        for yy, weight_y in ((y0, 1 - wy), (y0 + 1, wy)):
          for xx, weight_x in ((x0, 1 - wx), (x0 + 1, wx)):
            if 0 <= yy < height and 0 <= xx < width:
              out[b, y, x] += weight_y * weight_x * image[b, yy, xx]
  return out


def _random_flow_with_far_points(rng, shape):
  """Flows in [-3, 3] px plus some points well outside the image."""
  flow = rng.uniform(-3, 3, size=shape)
  far = rng.uniform(size=shape[:3]) < 0.2
  flow[far] = rng.uniform(-40, 40, size=(far.sum(), 2))
  return flow


@pytest.mark.parametrize("seed", range(3))
def test_zeros_padding_matches_grid_sample_restatement(seed):
  rng = np.random.default_rng(10 + seed)
  image = rng.uniform(size=(2, 7, 6, 3))
  flow = _random_flow_with_far_points(rng, (2, 7, 6, 2))
  # Points exactly on the border and half a pixel outside it.
  flow[0, 0, 0] = [0.0, 0.0]
  flow[0, 6, 5] = [-0.5, -0.5]      # samples (6.5, 5.5): a quarter of a pixel
  flow[0, 3, 0] = [0.0, 1.0]        # samples x = -1: zero
  flow[1, 0, 2] = [0.5, 0.0]        # samples y = -0.5: half the border row
  out = fgr_tf.dense_image_warp(image, flow, padding="zeros").numpy()
  expected = _grid_sample_zeros(image, flow)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
  np.testing.assert_allclose(out[0, 6, 5], 0.25 * image[0, 6, 5], atol=1e-12)
  np.testing.assert_array_equal(out[0, 3, 0], 0.0)
  np.testing.assert_allclose(out[1, 0, 2], 0.5 * image[1, 0, 2], atol=1e-12)
  far = np.abs(flow).max(-1) > 20
  assert far.any() and np.all(out[far] == 0.0)
  # Edge padding differs exactly where a point leaves the image.
  edge = fgr_tf.dense_image_warp(image, flow).numpy()
  assert np.abs(edge - out).max() > 0.1


def test_zeros_padding_gradients_match_restatement_differences():
  rng = np.random.default_rng(20)
  image = rng.uniform(size=(1, 6, 5, 2))
  flow = _random_flow_with_far_points(rng, (1, 6, 5, 2))
  cotangent = rng.normal(size=image.shape)
  with tf.GradientTape() as tape:
    flow_t, image_t = tf.constant(flow), tf.constant(image)
    tape.watch([flow_t, image_t])
    scalar = tf.reduce_sum(
        fgr_tf.dense_image_warp(image_t, flow_t, padding="zeros") * cotangent)
  grad_flow, grad_image = tape.gradient(scalar, [flow_t, image_t])
  eps = 1e-6
  numeric = np.zeros_like(flow)
  for index in np.ndindex(flow.shape):
    plus, minus = flow.copy(), flow.copy()
    plus[index] += eps
    minus[index] -= eps
    numeric[index] = ((_grid_sample_zeros(image, plus) -
                       _grid_sample_zeros(image, minus)) * cotangent).sum()
  numeric /= 2 * eps
  # Random flows are almost surely away from integer query points.
  np.testing.assert_allclose(grad_flow, numeric, rtol=0, atol=1e-7)
  # Linear in the image: the image gradient is the transposed warp.
  basis = np.zeros_like(image)
  basis[0, 2, 3, 1] = 1.0
  np.testing.assert_allclose(
      grad_image[0, 2, 3, 1],
      (_grid_sample_zeros(basis, flow) * cotangent).sum(), atol=1e-12)


def test_zeros_padding_zero_flow_gradient_is_forward_difference():
  """As grid_sample at integer points: forward difference, against 0 past
  the last row/column (edge padding uses the backward difference there)."""
  rng = np.random.default_rng(21)
  image = rng.uniform(size=(1, 5, 4, 1))
  cotangent = np.ones_like(image)
  flow = tf.zeros((1, 5, 4, 2), tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(flow)
    out = fgr_tf.dense_image_warp(image, flow, padding="zeros")
    scalar = tf.reduce_sum(out * cotangent)
  np.testing.assert_array_equal(out, image)
  grad = tape.gradient(scalar, flow).numpy()
  padded = np.pad(image, [(0, 0), (0, 1), (0, 1), (0, 0)])
  np.testing.assert_allclose(grad[..., 0], -np.diff(padded, axis=1)[:, :, :-1,
                                                                   0])
  np.testing.assert_allclose(grad[..., 1], -np.diff(padded, axis=2)[:, :-1, :,
                                                                   0])


def test_zeros_padding_second_derivatives_match_finite_differences():
  rng = np.random.default_rng(22)
  image = tf.constant(rng.uniform(size=(1, 5, 6, 2)))
  flow = tf.constant(rng.uniform(-2.5, 2.5, size=(1, 5, 6, 2)))
  cot = tf.constant(rng.normal(size=(1, 5, 6, 2)))
  probe = tf.constant(rng.normal(size=(1, 5, 6, 2)))

  def first_order(image, flow):
    with tf.GradientTape() as tape:
      tape.watch(flow)
      out = fgr_tf.dense_image_warp(image, flow, padding="zeros")
      scalar = tf.reduce_sum(out * cot)
    return tf.reduce_sum(tape.gradient(scalar, flow) * probe)

  with tf.GradientTape() as tape:
    tape.watch([image, flow])
    value = first_order(image, flow)
  grad_image, grad_flow = tape.gradient(value, [image, flow])
  assert np.abs(grad_flow.numpy()).max() > 0.1
  eps = 1e-6
  for wrt, analytic in ((0, grad_image), (1, grad_flow)):
    direction = tf.constant(rng.normal(size=(1, 5, 6, 2)))
    plus, minus = [image, flow], [image, flow]
    plus[wrt] = plus[wrt] + eps * direction
    minus[wrt] = minus[wrt] - eps * direction
    numeric = (first_order(*plus) - first_order(*minus)) / (2 * eps)
    np.testing.assert_allclose(numeric, tf.reduce_sum(analytic * direction),
                               rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_zeros_padding_under_tf_function_and_xla(jit):
  rng = np.random.default_rng(23)
  image = rng.uniform(size=(2, 7, 5, 3))
  flow = _random_flow_with_far_points(rng, (2, 7, 5, 2))
  expected = _grid_sample_zeros(image, flow)

  @tf.function(jit_compile=jit)
  def warp_and_grad(image, flow):
    with tf.GradientTape() as tape:
      tape.watch(flow)
      out = fgr_tf.dense_image_warp(image, flow, padding="zeros")
      total = tf.reduce_sum(out)
    return out, tape.gradient(total, flow)

  out, grad = warp_and_grad(tf.constant(image, tf.float32),
                            tf.constant(flow, tf.float32))
  assert out.dtype == tf.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert np.isfinite(grad.numpy()).all()


def test_padding_is_checked_and_edge_is_the_default():
  rng = np.random.default_rng(24)
  image = rng.uniform(size=(1, 4, 4, 1))
  flow = rng.uniform(-3, 3, size=(1, 4, 4, 2))
  np.testing.assert_array_equal(
      fgr_tf.dense_image_warp(image, flow),
      fgr_tf.dense_image_warp(image, flow, padding="edge"))
  with pytest.raises(ValueError, match="padding must be one of"):
    fgr_tf.dense_image_warp(image, flow, padding="reflect")


@pytest.mark.parametrize("padding", ["edge", "zeros"])
def test_prepared_image_warps_as_dense_image_warp(padding):
  """`warp_prepared(prepare_image(x))` (the attacks' loop form) gives the
  same values and gradients (flow and image) as `dense_image_warp`, for
  flows reaching past the border."""
  rng = np.random.default_rng(5)
  image = tf.constant(rng.uniform(size=(2, 6, 7, 3)))
  flow = tf.constant(rng.uniform(-4, 4, size=(2, 6, 7, 2)))
  cot = tf.constant(rng.normal(size=(2, 6, 7, 3)))
  results = []
  for prepared in (False, True):
    with tf.GradientTape() as tape:
      tape.watch([image, flow])
      if prepared:
        out = warp.warp_prepared(warp.prepare_image(image, padding), flow)
      else:
        out = fgr_tf.dense_image_warp(image, flow, padding=padding)
      total = tf.reduce_sum(out * cot)
    results.append([out] + tape.gradient(total, [image, flow]))
  for a, b in zip(*results):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert np.abs(results[0][2].numpy()).max() > 0.1


def test_warp_keeps_the_static_channel_count():
  """Traced with unknown batch and size, the output keeps its static
  channels (Keras runs a convolution whose input has unknown channels
  through XLA: 10x slower in the attacks)."""
  shapes = []

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3]),
                                tf.TensorSpec([None, None, None, 2])])
  def warped(image, flow):
    for padding in warp.PADDINGS:
      shapes.append(fgr_tf.dense_image_warp(image, flow, padding).shape)
    return image

  warped.get_concrete_function()
  assert [shape.as_list() for shape in shapes] == [[None, None, None, 3]] * 2


def test_prepare_image_and_warp_prepared_check_their_inputs():
  with pytest.raises(TypeError, match="floating-point"):
    warp.prepare_image(tf.zeros([1, 4, 4, 1], tf.int32))
  with pytest.raises(ValueError, match="padding"):
    warp.prepare_image(tf.zeros([1, 4, 4, 1]), padding="reflect")
  with pytest.raises(ValueError, match="height >= 2"):
    warp.prepare_image(tf.zeros([1, 1, 4, 1]))
  prepared = warp.prepare_image(tf.zeros([1, 4, 5, 1]), padding="zeros")
  assert prepared.image_size() == (4, 5)
  with pytest.raises(ValueError, match="same height and width"):
    warp.warp_prepared(prepared, tf.zeros([1, 4, 4, 2]))
  with pytest.raises(ValueError, match="flow of shape"):
    warp.warp_prepared(prepared, tf.zeros([1, 4, 5, 3]))
