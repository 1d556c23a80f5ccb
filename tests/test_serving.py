"""Serving robustness: a soak of valid and invalid requests (bench)."""

import keras
import numpy as np
import tensorflow as tf

import fgr_tf
from bench import serving_soak
from fgr_tf import export
from fgr_tf.backbones import layers
from helpers import assert_close_float32


def test_soak_rejects_every_invalid_request_and_does_not_grow(tmp_path):
  keras.utils.set_random_seed(0)
  model = fgr_tf.backbones.build("small_cnn", 10, (28, 28, 1))
  export_dir = export.export_saved_model(model, str(tmp_path / "served"))
  stats = serving_soak.soak(export_dir, requests=400, warmup=100)
  assert stats["wrong"] == []
  assert stats["accepted"] > 50 and stats["rejected"] > 50
  # 300 requests after the warm-up: no leak (a leak of one batch per
  # request would be >= 300 * 3 KiB per image...; allow allocator noise).
  assert stats["rss_end_mb"] - stats["rss_warm_mb"] < 25, stats


def test_exported_model_with_fused_batchnorm_and_matmul_convs_is_differentiable(
    tmp_path):
  """The SavedModel holds the custom-gradient layers (fused BatchNorm, the
  matmul form of a 2x2 conv); gradients through the loaded signature
  equal the Keras model's."""
  keras.utils.set_random_seed(0)
  factory = layers.LayerFactory()
  inputs = keras.Input((2, 2, 3))
  x = factory.batch_norm("bn")(factory.conv(4, "conv")(inputs))
  x = keras.layers.Flatten()(factory.relu()(x))
  model = keras.Model(inputs, factory.dense(3, "dense")(x))
  export_dir = export.export_saved_model(model, str(tmp_path / "served"))
  loaded = tf.saved_model.load(export_dir)  # keeps the variables alive
  serve = loaded.signatures["serving_default"]
  images = tf.constant(
      np.random.default_rng(0).uniform(size=(4, 2, 2, 3)), tf.float32)

  def input_gradient(probabilities_of):
    with tf.GradientTape() as tape:
      tape.watch(images)
      probabilities = probabilities_of(images)[:, 0]
    return tape.gradient(probabilities, images).numpy()

  served = input_gradient(lambda x: serve(images=x)["probabilities"])
  expected = input_gradient(lambda x: tf.nn.softmax(model(x)))
  assert np.abs(expected).max() > 1e-4
  # float32 round-off: forward conv (27 terms), dense (16), softmax; back
  # through them (the conv's input gradient sums 3 * 3 * 4 = 36 terms).
  assert_close_float32(served, expected, reduction=36, depth=6)
