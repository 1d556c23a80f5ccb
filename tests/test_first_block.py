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


def test_pool_with_winners_is_the_first_maximum():
  """Winners: the row-major index of the first maximum (as
  `pooling.first_max_mask`), ph * pw for a window holding a NaN; y equals
  TF's max pool where there is no NaN."""
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=(3, 6, 9, 4)), 0)  # many ties
  x[0, 0, 0, 0] = np.nan
  y, winners = first_block.pool_with_winners(tf.constant(x), (2, 3))
  windows = pooling.windows(tf.constant(x), (2, 3))
  mask = pooling.first_max_mask(windows, tf.reduce_max(windows, [2, 4]))
  expected = np.argmax(np.transpose(mask.numpy(), [0, 1, 3, 2, 4, 5]).reshape(
      3, 3, 3, 6, 4), axis=3)
  expected[mask.numpy().sum(axis=(2, 4)) == 0] = 6
  assert winners.dtype == tf.int8
  np.testing.assert_array_equal(winners, expected)
  assert winners[0, 0, 0, 0] == 6
  pooled = tf.nn.max_pool2d(x, (2, 3), (2, 3), "VALID").numpy()
  finite = np.isfinite(y.numpy())
  np.testing.assert_array_equal(y.numpy()[finite], pooled[finite])
  np.testing.assert_array_equal(
      first_block.winners_mask(winners, (2, 3), tf.float64), mask)


@pytest.mark.parametrize("size,pool_size", [(8, (2, 2)), (7, (2, 2)),
                                            (9, (3, 3))])
def test_block_equals_the_ops_and_their_gradients(size, pool_size):
  """`first_block.block`: the values of relu(max_pool(conv + bias)), and
  its gradients w.r.t. the images, kernel and bias (the images' by XLA
  from the winners; under pfor the autodiff) equal TF's autodiff of the
  ops: float64 to 1e-12 relative, float32 to its round-off."""
  for dtype in (tf.float64, tf.float32):
    images, kernel, bias, cotangents = _inputs(dtype, 3, size, 8, 2,
                                               pool_size, seed=size)
    @tf.function
    def both(images, kernel, bias, cotangent):
      results = []
      for function in (first_block.block(kernel, bias, pool_size),
                       lambda x: _block(x, kernel, bias, pool_size)):
        with tf.GradientTape() as tape:
          tape.watch([images, kernel, bias])
          outputs = function(images)
          loss = tf.reduce_sum(cotangent * outputs)
        results.append([outputs] + tape.gradient(loss,
                                                 [images, kernel, bias]))
      return results

    @tf.function
    def jacobians(images):
      jacobian = []
      for function in (first_block.block(kernel, bias, pool_size),
                       lambda x: _block(x, kernel, bias, pool_size)):
        with tf.GradientTape() as tape:
          tape.watch(images)
          sums = tf.reduce_sum(cotangents * function(images)[None],
                               axis=[1, 2, 3, 4])
        jacobian.append(tape.jacobian(sums, images))
      return jacobian

    (actual, expected) = both(images, kernel, bias, cotangents[0])
    actual_pfor, expected_pfor = jacobians(images)
    pairs = list(zip(actual, expected)) + [(actual_pfor, expected_pfor)]
    for name, (a, e) in zip(["outputs", "images", "kernel", "bias", "pfor"],
                            pairs):
      scale = max(float(np.abs(e).max()), 1e-30)
      if dtype == tf.float64:
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-12 * scale,
                                   err_msg=name)
      else:
        assert_close_float32(a, e, reduction=9 * 8 * 3 * size * size,
                             scale=scale, err_msg=name)


@pytest.mark.parametrize("block", ["xla", "ops"])
def test_attacks_prepared_function_takes_the_block_at_a_fixed_batch(
    block, monkeypatch):
  """In an attack's loop at a fixed batch (`attacks.common.
  weights_read_once`) the quickstart CNN's first block runs as
  `first_block.block` (unless FGR_TF_FIRST_BLOCK=ops; never with a
  varying batch), and the logits and their input gradients are those of
  the model to float32 round-off."""
  monkeypatch.setattr(first_block, "BLOCK", block)
  keras.utils.set_random_seed(1)
  model = fgr_tf.backbones.build("small_cnn", 10, (12, 12, 1))
  images = tf.constant(np.random.default_rng(1).uniform(
      size=(5, 12, 12, 1)), tf.float32)
  built = []
  original = first_block.block
  monkeypatch.setattr(first_block, "block",
                      lambda *a: built.append(1) or original(*a))
  from fgr_tf.attacks import common  # pylint: disable=g-import-not-at-top

  def gradients(varying_batch):
    @tf.function
    def run(images):
      with common.weights_read_once(model, varying_batch):
        with tf.GradientTape() as tape:
          tape.watch(images)
          logits = common.logits_of(model, images)
          loss = tf.reduce_sum(logits * tf.range(10, dtype=tf.float32))
        return logits, tape.gradient(loss, images)
    return run(images)

  with tf.GradientTape() as tape:
    tape.watch(images)
    logits = model(images, training=False)
    loss = tf.reduce_sum(logits * tf.range(10, dtype=tf.float32))
  expected = (logits, tape.gradient(loss, images))
  for varying_batch in (True, False):
    del built[:]
    actual = gradients(varying_batch)
    assert bool(built) == (block == "xla" and not varying_batch)
    for a, e in zip(actual, expected):
      assert_close_float32(a, e, reduction=3 * 3 * 64,
                           depth=8)
