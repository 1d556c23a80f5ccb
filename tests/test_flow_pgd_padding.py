"""flow_pgd's `padding` option: passed through to the warp, part of the
compiled attack's key, checked."""

import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import attacks
from helpers import tiny_backbone
from helpers import tiny_data


@pytest.fixture(scope="module")
def model_and_data():
  images, labels = tiny_data(n=6, size=8, channels=2, classes=3, seed=5)
  # Bright borders, so that zeros and edge padding differ visibly.
  images[:, 0], images[:, -1] = 1.0, 1.0
  return tiny_backbone(size=8, channels=2, classes=3, seed=5), images, labels


def _original_multi_step(model, images, labels, epsilon, steps, padding):
  """The original's loop (attacks/gradient.py) in eager TF: signed steps of
  epsilon/steps on the normalized flow along d(mean CE), clamp, clip."""
  flow_xy = tf.zeros(images.shape[:3] + (2,))

  def deform(flow_xy):
    flow = fgr_tf.normalized_to_pixel_flow(flow_xy, *images.shape[1:3])
    return tf.clip_by_value(
        fgr_tf.dense_image_warp(images, flow, padding=padding), 0, 1)

  for _ in range(steps):
    with tf.GradientTape() as tape:
      tape.watch(flow_xy)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels, model(deform(flow_xy), training=False)))
    flow_xy = tf.clip_by_value(
        flow_xy + epsilon / steps * tf.sign(tape.gradient(loss, flow_xy)),
        -epsilon, epsilon)
  return flow_xy, deform(flow_xy)


@pytest.mark.parametrize("padding", ["edge", "zeros"])
def test_flow_pgd_warps_with_the_requested_padding(model_and_data, padding):
  model, images, labels = model_and_data
  result = attacks.flow_pgd(model, images, labels, epsilon=0.3, steps=4,
                            padding=padding)
  np.testing.assert_allclose(
      result.adv_images,
      np.clip(fgr_tf.dense_image_warp(images, result.flow, padding=padding),
              0, 1), atol=1e-6)
  flow_xy, adv = _original_multi_step(model, images, labels, 0.3, 4, padding)
  np.testing.assert_allclose(
      fgr_tf.pixel_to_normalized_flow(result.flow, 8, 8), flow_xy, atol=1e-6)
  np.testing.assert_allclose(result.adv_images, adv, atol=1e-6)


def test_edge_is_the_default_and_zeros_differs(model_and_data):
  model, images, labels = model_and_data
  default = attacks.flow_pgd(model, images, labels, epsilon=0.3, steps=4)
  edge = attacks.flow_pgd(model, images, labels, epsilon=0.3, steps=4,
                          padding="edge")
  zeros = attacks.flow_pgd(model, images, labels, epsilon=0.3, steps=4,
                           padding="zeros")
  np.testing.assert_array_equal(default.adv_images, edge.adv_images)
  # Different compiled functions (the padding is part of the cache key).
  assert np.abs(zeros.adv_images.numpy() - edge.adv_images.numpy()).max() > 0.1


def test_unknown_padding_is_rejected(model_and_data):
  model, images, labels = model_and_data
  with pytest.raises(ValueError, match="padding must be one of"):
    attacks.flow_pgd(model, images, labels, padding="border")
