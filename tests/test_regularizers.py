"""FGR / IGR penalties against the original's golden values (SPEC §3)."""

import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import regularizers
from fgr_tf.backbones import layers as layers_lib
from fgr_tf.backbones import vgg as vgg_lib
from conftest import load_npz
from helpers import assert_close_float32, no_bn_model

H = W = 32
# The golden VGG on its batch of 4: the longest float32 sum has
# batch * h * w = 4 * 32 * 32 = 4096 terms (bn0's statistics, conv0's
# kernel gradient); 11 reducing layers (5 conv, 5 BatchNorm, dense).
GOLDEN_REDUCTION = 4 * H * W
GOLDEN_LAYERS = 11


@pytest.fixture(scope="module")
def golden():
  return load_npz("golden_shared32.npz")


def build_golden_vgg(golden, dtype="float64"):
  """The reference's small VGG (float64 by default), with its weights."""
  cfg = [v if v == "M" else int(v) for v in golden["cfg"]]
  model = vgg_lib.vgg(cfg, 10, (H, W, 3),
                      layers_lib.LayerFactory(dtype=dtype))
  convs = sum(1 for v in cfg if v != "M")
  for i in range(convs):
    model.get_layer(f"conv{i}").set_weights(
        [golden[f"conv{i}/kernel"], golden[f"conv{i}/bias"]])
    bn = model.get_layer(f"bn{i}")
    assert bn.epsilon == golden[f"bn{i}/eps"]
    gamma = golden[f"bn{i}/gamma"]
    bn.set_weights([gamma, golden[f"bn{i}/beta"], np.zeros_like(gamma),
                    np.ones_like(gamma)])
  model.get_layer("dense").set_weights(
      [golden["dense/kernel"], golden["dense/bias"]])
  return model


def interior_penalty(flow_grad_xy):
  """The original's penalty: like ours but without the last column (x) and
  the last row (y), where the reference's flow gradient is 0 and ours has
  the backward difference (SPEC §2). [B, H, W, 2] normalized -> scalar."""
  mask = np.ones((1, H, W, 2), flow_grad_xy.dtype.as_numpy_dtype)
  mask[:, :, W - 1, 0] = 0
  mask[:, H - 1, :, 1] = 0
  return tf.reduce_mean(
      tf.reduce_sum(tf.square(flow_grad_xy * mask), axis=[1, 2, 3]))


def golden_key(variable):
  """Keras variable path (e.g. 'conv0/kernel') -> golden npz key."""
  return variable.path.split("/")[-2] + "/" + variable.path.split("/")[-1]


def test_golden_small_vgg(golden):
  model = build_golden_vgg(golden)
  images = tf.constant(golden["images"])
  labels = tf.constant(golden["labels"])
  lam = float(golden["lam"])
  with tf.GradientTape(persistent=True) as tape:
    loss, input_grad, logits = regularizers.loss_and_input_gradient(
        model, images, labels, training=True)
    flow_grad = regularizers.flow_gradient_from_input_gradient(
        images, input_grad)
    ours_xy = fgr_tf.pixel_flow_gradient_to_normalized(flow_grad, H, W)
    penalty = regularizers.penalty_from_flow_gradient(flow_grad)
    interior = interior_penalty(ours_xy)
    reference_total = loss + lam * interior

  # Ours are float64; the reference sampled its input through a float32
  # grid (affine_grid: positions off by up to 1.9e-6 px; emulating that
  # moves our logits from 5.8e-6 to 1.7e-7 of its). So these differences
  # are fixed in the file, the same on every CPU (float64 round-off here is
  # ~1e-15): measured logits 5.8e-6, CE 1.1e-7 relative, flow gradient
  # 2.2e-6 of its max, penalty 7.4e-7, parameter gradients <= 1e-5 of
  # their max. The tolerances sit above those, below any pitfall (>= 1e-2).
  np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(loss, golden["ce"], rtol=1e-6)

  ref_xy = golden["flow_grad_xy_normalized"]
  ours = ours_xy.numpy()
  scale = np.abs(ref_xy).max()
  np.testing.assert_allclose(ours[:, :, :W - 1, 0], ref_xy[:, :, :W - 1, 0],
                             rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(ours[:, :H - 1, :, 1], ref_xy[:, :H - 1, :, 1],
                             rtol=1e-5, atol=1e-5 * scale)
  assert np.all(ref_xy[:, :, W - 1, 0] == 0) and np.all(
      ref_xy[:, H - 1, :, 1] == 0)
  assert np.abs(ours[:, :, W - 1, 0]).max() > 1e-3 * scale

  # The penalties differ by exactly the last row / column terms.
  last_terms = np.mean(np.sum(ours[:, :, W - 1, 0] ** 2, axis=1) +
                       np.sum(ours[:, H - 1, :, 1] ** 2, axis=1))
  # Exactly, in our own numbers (float64 on both sides, sums of <= 8192
  # terms: round-off ~1e-14):
  np.testing.assert_allclose(penalty - interior, last_terms,
                             rtol=1e-10)
  # Against the reference, whose penalty (144.82) is a float32 result and
  # whose flow gradient agrees with ours to ~1e-6 relative:
  np.testing.assert_allclose(interior, golden["penalty"], rtol=1e-5)
  np.testing.assert_allclose(penalty.numpy() - golden["penalty"], last_terms,
                             rtol=0, atol=2e-6 * golden["penalty"])
  np.testing.assert_allclose(penalty,
                             np.mean(np.sum(ours ** 2, axis=(1, 2, 3))),
                             rtol=1e-10)

  # d total / d weights, with the reference's (interior) penalty, matches
  # the reference's parameter gradients (float64 ours: see above; +1e-9:
  # the conv biases' are zero but for float64 round-off, ~1e-10).
  grads = tape.gradient(reference_total, model.trainable_variables)
  for variable, grad in zip(model.trainable_variables, grads):
    key = golden_key(variable)
    expected = golden[key + "_grad"]
    np.testing.assert_allclose(
        grad, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max() + 1e-9,
        err_msg=key)


def test_fast_path_equals_differentiating_through_the_warp(golden):
  model = build_golden_vgg(golden)
  images = tf.constant(golden["images"])
  labels = tf.constant(golden["labels"])
  loss_warp, grad_warp = regularizers.flow_gradient_via_warp(
      model, images, labels)
  loss, input_grad, _ = regularizers.loss_and_input_gradient(
      model, images, labels)
  grad_fast = regularizers.flow_gradient_from_input_gradient(images,
                                                             input_grad)
  # float64 on both sides, the same model: the two paths differ by float64
  # round-off, u64 * sqrt(4096) * 22 layers ~ 2e-13 relative.
  np.testing.assert_allclose(loss, loss_warp, rtol=1e-12)
  np.testing.assert_allclose(grad_fast, grad_warp, rtol=1e-9, atol=1e-12)
  _, penalty = fgr_tf.flow_gradient_penalty(model, images, labels)
  np.testing.assert_allclose(
      penalty, regularizers.penalty_from_flow_gradient(grad_warp), rtol=1e-9)


def test_tfa_pitfall_penalty_is_only_the_last_row_and_column(golden):
  """tfa's warp at zero flow: zero gradient except the last row/column.

  tfa_shared32.npz holds the penalty an FGR built on tfa's warp computes
  (0.88 where the reference has 144.8). It equals our penalty restricted to
  the last row (dy) and last column (dx), where alpha = 1 and tfa's
  gradient does pass.
  """
  tfa = load_npz("tfa_shared32.npz")
  model = build_golden_vgg(golden)
  images = tf.constant(tfa["images"])
  loss, input_grad, _ = regularizers.loss_and_input_gradient(
      model, images, tf.constant(tfa["labels"]))
  flow_grad = regularizers.flow_gradient_from_input_gradient(
      images, input_grad).numpy()
  # float64 ours against stored values that carry float32 round-off of
  # tfa's warp (measured: CE 2e-9, edge gradient 8e-8 of its max, penalty
  # 2e-8): fixed in the file, the same on every CPU.
  np.testing.assert_allclose(loss, tfa["ce"], rtol=1e-6)
  tfa_grad = tfa["flow_grad_pixel_dydx"]
  assert np.all(tfa_grad[:, :H - 1, :, 0] == 0)
  assert np.all(tfa_grad[:, :, :W - 1, 1] == 0)
  edge = np.zeros_like(flow_grad)
  edge[:, H - 1, :, 0] = flow_grad[:, H - 1, :, 0]
  edge[:, :, W - 1, 1] = flow_grad[:, :, W - 1, 1]
  np.testing.assert_allclose(edge, tfa_grad, rtol=1e-4,
                             atol=1e-6 * np.abs(tfa_grad).max())
  np.testing.assert_allclose(regularizers.penalty_from_flow_gradient(edge),
                             tfa["penalty"], rtol=1e-4)
  full = regularizers.penalty_from_flow_gradient(flow_grad).numpy()
  assert full > 100 * tfa["penalty"]


def test_input_gradient_penalty_is_mean_squared_norm_of_batch_mean_gradient():
  # Inference-mode BatchNorm: samples are independent, so the gradient of
  # the batch mean w.r.t. x_b is (1/B) d CE_b / d x_b.
  model = no_bn_model()
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(size=(5, 8, 8, 2)))
  labels = tf.constant([0, 1, 2, 0, 1])
  loss, penalty = fgr_tf.input_gradient_penalty(model, images, labels,
                                                training=False)
  per_sample = []
  for b in range(5):
    x = images[b:b + 1]
    with tf.GradientTape() as tape:
      tape.watch(x)
      ce = regularizers.sparse_ce_sum(model(x, training=False),
                                      labels[b:b + 1])
    per_sample.append(np.sum((tape.gradient(ce, x).numpy() / 5) ** 2))
  # float64 on both sides; sums of 128 terms.
  np.testing.assert_allclose(penalty, np.mean(per_sample), rtol=1e-10)
  assert penalty > 0 and np.isfinite(loss)


def test_global_batch_size_gives_the_share_of_the_global_mean():
  model = no_bn_model()
  rng = np.random.default_rng(1)
  images = tf.constant(rng.uniform(size=(6, 8, 8, 2)))
  labels = tf.constant([0, 1, 2, 0, 1, 2])
  loss, penalty = fgr_tf.flow_gradient_penalty(model, images, labels,
                                               training=False)
  halves = [fgr_tf.flow_gradient_penalty(model, images[s], labels[s],
                                         training=False, global_batch_size=6)
            for s in (slice(0, 3), slice(3, 6))]
  # float64 on both sides; sums of <= 6 * 128 terms.
  np.testing.assert_allclose(sum(h[0] for h in halves), loss, rtol=1e-12)
  np.testing.assert_allclose(sum(h[1] for h in halves), penalty, rtol=1e-12)
  # Each sample's gradient carries 1/B, so the penalty scales as 1/B^2:
  # doubling the batch with a copy of itself divides it by 4.
  _, doubled = fgr_tf.flow_gradient_penalty(
      model, tf.concat([images, images], 0), tf.concat([labels, labels], 0),
      training=False)
  np.testing.assert_allclose(doubled, penalty / 4, rtol=1e-12)


def test_golden_parameter_gradients_in_float32_through_fast_batchnorm(golden):
  """float32 takes the hand-written BatchNorm (`train_batch_norm`); second
  derivatives still match the original's parameter gradients of
  ce + lam * penalty."""
  model = build_golden_vgg(golden, dtype="float32")
  images = tf.constant(golden["images"], tf.float32)
  assert model.get_layer("bn0")._fast_path(images)
  labels = tf.constant(golden["labels"])
  with tf.GradientTape() as tape:
    loss, input_grad, _ = regularizers.loss_and_input_gradient(
        model, images, labels)
    xy = fgr_tf.pixel_flow_gradient_to_normalized(
        regularizers.flow_gradient_from_input_gradient(images, input_grad),
        H, W)
    interior = interior_penalty(xy)
    total = loss + float(golden["lam"]) * interior
  # float32 round-off (the reference's own, <= 1e-5 of the max, is far
  # below): the penalty crosses the layers forward and back, then its
  # sum of squares; the parameter gradients cross them 3 times.
  assert_close_float32(interior, golden["penalty"], GOLDEN_REDUCTION,
                       2 * GOLDEN_LAYERS + 1, err_msg="interior penalty")
  grads = tape.gradient(total, model.trainable_variables)
  for variable, grad in zip(model.trainable_variables, grads):
    key = golden_key(variable)
    expected = golden[key + "_grad"]
    scale = None
    if key.startswith("conv") and key.endswith("bias"):
      # BatchNorm follows every conv: zero but for the round-off of the
      # sums (over batch * h * w) that make the kernel's gradient.
      scale = np.abs(golden[key.replace("bias", "kernel") + "_grad"]).max()
    assert_close_float32(grad, expected, GOLDEN_REDUCTION,
                         3 * GOLDEN_LAYERS, scale=scale, err_msg=key)
