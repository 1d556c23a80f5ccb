"""The first block's input gradients for many cotangents (ADef's)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf.backbones import first_block
from fgr_tf.backbones import folding
from fgr_tf.backbones import pooling
from helpers import assert_close_float32


def _block(images, kernel, bias, pool_size):
  """relu(max_pool(conv(images) + bias)) by TF's ops and `pooling`."""
  z = tf.nn.bias_add(tf.nn.conv2d(images, kernel, 1, "SAME"), bias)
  return tf.nn.relu(pooling.max_pool(z, pool_size))


def _inputs(dtype, batch, size, channels, k, pool_size, seed):
  """Images with flat regions (tied pool windows, ReLU zeros), a kernel,
  a bias, and k cotangents at the block's output."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, size, size, 1))
  images[:, : size // 2, : size // 2] = 0.5  # ties after the convolution
  kernel = rng.normal(size=(3, 3, 1, channels))
  bias = rng.normal(size=(channels,)) * 0.5
  out = (size // pool_size[0], size // pool_size[1])
  cotangents = rng.normal(size=(k, batch) + out + (channels,))
  return [tf.constant(a, dtype) for a in (images, kernel, bias, cotangents)]


@pytest.mark.parametrize("batch,size,pool_size", [
    (2, 8, (2, 2)), (5, 7, (2, 2)), (3, 9, (3, 3)), (1, 6, (2, 3))])
def test_input_gradients_equal_the_blocks_autodiff(batch, size, pool_size):
  """Against TF's autodiff of the block, one cotangent at a time: equal in
  float64 up to the order of the tap sums, and in float32 to its
  round-off (9 taps x C1 channels summed); odd sizes (the pool drops the
  last row and column), non-square pools, tied windows and ReLU zeros."""
  k, channels = 3, 16
  for dtype in (tf.float64, tf.float32):
    images, kernel, bias, cotangents = _inputs(dtype, batch, size, channels,
                                               k, pool_size, seed=batch)
    expected = []
    for j in range(k):
      with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(cotangents[j] *
                             _block(images, kernel, bias, pool_size))
      expected.append(tape.gradient(loss, images))
    expected = np.stack([e.numpy() for e in expected])
    z = tf.nn.bias_add(tf.nn.conv2d(images, kernel, 1, "SAME"), bias)
    actual = tf.function(first_block.input_gradients, jit_compile=True)(
        cotangents, z, kernel, pool_size).numpy()
    assert actual.shape == (k, batch, size, size, 1)
    assert np.abs(expected).max() > 0
    if dtype == tf.float64:
      np.testing.assert_allclose(actual, expected, rtol=0,
                                 atol=1e-12 * np.abs(expected).max())
    else:
      assert_close_float32(actual, expected, reduction=9 * channels,
                           scale=np.abs(expected).max())


def test_first_block_layers_of_the_backbones():
  """The quickstart CNN's and VGG's first (conv, pool) are found; a ResNet
  (no pool after its first convolution) and blocks whose images or
  BatchNorm output also go elsewhere have none (a jacobian stopped at the
  pool would miss that path)."""
  small = fgr_tf.backbones.build("small_cnn", 10, (28, 28, 1))
  conv, pool = folding.first_block_layers(small)
  assert (conv.name, pool.name) == (small.layers[1].name, small.layers[4].name)
  vgg = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))
  assert folding.first_block_layers(vgg) is not None
  assert folding.first_block_layers(
      fgr_tf.backbones.build("resnet18", 10, (32, 32, 3))) is None

  def functional(skip_from):
    inputs = keras.Input((8, 8, 1))
    z = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    bn = keras.layers.BatchNormalization()(z)
    x = keras.layers.MaxPooling2D()(keras.layers.ReLU()(bn))
    x = keras.layers.Flatten()(x)
    other = {"images": inputs, "bn": bn, None: None}[skip_from]
    if other is not None:
      x = keras.layers.Concatenate()([x, keras.layers.Flatten()(other)])
    return keras.Model(inputs, keras.layers.Dense(3)(x))

  assert folding.first_block_layers(functional(None)) is not None
  assert folding.first_block_layers(functional("images")) is None
  assert folding.first_block_layers(functional("bn")) is None


def test_record_captures_the_prepared_first_block():
  """Run in `record()`, the prepared function fills the entry with the
  block's input, pool input and output (equal to the model's own
  intermediate tensors to float32 round-off) and the folded kernel; a
  second forward pass does not overwrite it; outside `record()` nothing
  is recorded."""
  keras.utils.set_random_seed(0)
  model = fgr_tf.backbones.build("small_cnn", 10, (12, 12, 1))
  images = tf.constant(np.random.default_rng(0).uniform(
      size=(4, 12, 12, 1)), tf.float32)
  function = folding.prepared_inference_function(model)(varying_batch=True)
  with first_block.record() as entry:
    function(images)
    first_outputs = entry.outputs
    function(images[:2])
  assert entry.outputs is first_outputs
  assert entry.kernel.shape == (3, 3, 1, 32) and entry.pool_size == (2, 2)
  assert first_block.applies(entry)
  conv, pool = folding.first_block_layers(model)
  bn = model.get_layer("bn0")
  probe = keras.Model(model.inputs, [bn.output, pool.output])
  pool_input, outputs = probe(images, training=False)
  np.testing.assert_array_equal(entry.inputs, images)
  assert_close_float32(entry.pool_input, pool_input, reduction=9)
  assert_close_float32(entry.outputs, outputs, reduction=9)
  assert first_block.recording() is None
  assert conv.name == "conv0"
