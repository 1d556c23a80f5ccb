"""Backbones: shapes, the original's layout, errors, exact 2nd derivatives."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import regularizers
from fgr_tf.backbones import batch_norm
from fgr_tf.backbones import train_batch_norm
from helpers import assert_close_float32


@pytest.mark.parametrize("name,shape,params", [
    ("vgg11", (32, 32, 3), 9_231_114),   # torchvision-style CIFAR VGG-11
    ("vgg13", (32, 32, 3), 9_416_010),
    ("vgg16", (32, 32, 3), 14_728_266),
    ("vgg19", (32, 32, 3), 20_040_522),
    ("resnet18", (32, 32, 3), 11_173_962),
    ("small_cnn", (28, 28, 1), None),
])
def test_build_gives_logits_and_the_original_parameter_counts(name, shape,
                                                              params):
  model = fgr_tf.backbones.build(name, 10, shape)
  logits = model(np.zeros((2,) + shape, np.float32), training=False)
  assert logits.shape == (2, 10)
  if params is not None:
    # trainable counts of the PyTorch CIFAR models (BN: gamma and beta).
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == params
  bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert bns and all(isinstance(l, batch_norm.BatchNormalization) for l in bns)
  assert all(l.epsilon == 1e-5 and l.momentum == 0.9 for l in bns)


def test_vgg_layout_matches_the_original():
  model = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))
  convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
  assert [c.filters for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
  assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs)
  assert sum(isinstance(l, keras.layers.MaxPooling2D)
             for l in model.layers) == 5
  assert model.get_layer("dense").kernel.shape == (512, 10)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="vgg12", num_classes=10, input_shape=(32, 32, 3)),
     "Unknown model 'vgg12'"),
    (dict(name="vgg11", num_classes=10, input_shape=(28, 28, 1)),
     "at least 32x32"),
    (dict(name="resnet18", num_classes=10, input_shape=(4, 4, 3)),
     "at least 8x8"),
    (dict(name="small_cnn", num_classes=1, input_shape=(28, 28, 1)),
     "num_classes=1"),
    (dict(name="small_cnn", num_classes=10, input_shape=(28, 28)),
     "input_shape=\\(28, 28\\)"),
])
def test_build_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fgr_tf.backbones.build(**kwargs)


def test_weight_decay_is_pytorch_coupled_l2():
  model = fgr_tf.backbones.build("small_cnn", 10, (8, 8, 1), weight_decay=5e-4)
  # One L2 loss per kernel, bias, gamma and beta: all parameters.
  assert len(model.losses) == len(model.trainable_weights)
  total = sum(float(l) for l in model.losses)
  expected = sum(5e-4 / 2 * np.sum(w.numpy() ** 2)
                 for w in model.trainable_weights)
  # float32 sums of squares (the longest: fc/kernel's 256 * 128 = 32768
  # terms), then the sum over the tensors.
  largest = max(int(np.prod(w.shape)) for w in model.trainable_weights)
  assert_close_float32(total, expected, largest, depth=2)
  with pytest.raises(ValueError, match="weight_decay=-1"):
    fgr_tf.backbones.build("small_cnn", 10, (8, 8, 1), weight_decay=-1)


def test_fused_batchnorm_equals_the_unfused_path(monkeypatch):
  """float32 runs TF's fused kernel; outputs, input gradients and the
  moving statistics (biased variance, as Keras) equal the unfused path."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(1.0, 2.0, size=(4, 5, 5, 3)), tf.float32)
  upstream = tf.constant(rng.normal(size=(4, 5, 5, 3)), tf.float32)

  def run():
    keras.utils.set_random_seed(0)
    layer = batch_norm.BatchNormalization(epsilon=1e-5, momentum=0.9)
    layer.build(x.shape)
    layer.gamma.assign([0.5, 1.0, 2.0])
    layer.beta.assign([0.1, -0.2, 0.3])
    with tf.GradientTape() as tape:
      tape.watch(x)
      train_out = layer(x, training=True)
    grad = tape.gradient(train_out, x, upstream)
    return [train_out, grad, layer.moving_mean, layer.moving_variance,
            layer(x, training=False)]

  fused = run()
  assert batch_norm.BatchNormalization(epsilon=1e-5)._fast_path(x)
  monkeypatch.setattr(batch_norm.BatchNormalization, "_fast_path",
                      lambda *args: False)
  unfused = run()
  # float32 sums over batch * h * w = 100 terms per channel, chained:
  # mean, then variance (the outputs, the moving variance), and two more
  # sums in the backward pass (the input gradient).
  reduction = 4 * 5 * 5
  depths = {"train": 2, "grad": 4, "moving_mean": 1, "moving_var": 2,
            "inference": 2}
  for name, a, b in zip(depths, fused, unfused):
    assert_close_float32(a, b, reduction, depths[name], err_msg=name)
  # Moving variance from the biased batch variance:
  assert_close_float32(
      fused[3], 0.9 + 0.1 * np.var(x.numpy(), axis=(0, 1, 2)), reduction,
      depth=2)


@pytest.mark.parametrize("elementwise", ["xla", "ops"])
def test_fused_batchnorm_second_derivatives_equal_the_float64_layer(
    elementwise, monkeypatch):
  """The hand-written gradient of the fused backward pass, all cotangents:
  a penalty on the gradients w.r.t. the input AND gamma and beta,
  differentiated w.r.t. conv kernel, gamma and beta, float32 fused vs the
  unfused float64 layer; its elementwise passes compiled by XLA (default)
  or as TF ops."""
  monkeypatch.setattr(train_batch_norm, "ELEMENTWISE", elementwise)
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(3, 5, 5, 2))
  upstream = rng.normal(size=(3, 5, 5, 4))
  kernel = rng.normal(size=(3, 3, 2, 4)) * 0.5
  gamma, beta = rng.uniform(0.5, 2.0, size=4), rng.normal(size=4)

  def outer_gradients(dtype):
    layer = batch_norm.BatchNormalization(epsilon=1e-5, dtype=dtype)
    layer.build((3, 5, 5, 4))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    w = tf.Variable(kernel, dtype=dtype)
    x = tf.constant(images, dtype)
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        inner.watch(x)
        conv = tf.nn.conv2d(x, w, 1, "SAME")
        y = layer(conv, training=True)
        loss = tf.reduce_sum(tf.nn.relu(y) * upstream) + tf.reduce_sum(
            tf.square(y))
      gx, gg, gb = inner.gradient(loss, [x, layer.gamma, layer.beta])
      penalty = (tf.reduce_sum(tf.square(gx)) + tf.reduce_sum(tf.square(gg))
                 + 0.5 * tf.reduce_sum(tf.square(gb)))
    return [g.numpy() for g in outer.gradient(penalty,
                                              [w, layer.gamma, layer.beta])]

  layer32 = batch_norm.BatchNormalization()
  assert layer32._fast_path(tf.zeros((3, 5, 5, 4)))
  for name, ours, exact in zip(["kernel", "gamma", "beta"],
                               outer_gradients("float32"),
                               outer_gradients("float64")):
    # float32 round-off: sums over batch * h * w = 75 terms (BatchNorm's
    # statistics, the kernel's and gamma's gradients); conv, mean and
    # variance forward (3), their backward (3), and back through both (6).
    assert_close_float32(ours, exact, 3 * 5 * 5, depth=12, err_msg=name)
    assert np.abs(exact).max() > 1e-3, name


@pytest.mark.parametrize("layer_cls", [batch_norm.BatchNormalization,
                                       keras.layers.BatchNormalization])
def test_batchnorm_second_derivative_vs_finite_differences(layer_cls):
  """d IGR-penalty / d conv kernel through train-mode BatchNorm, float64.

  Keras's layer gets it wrong (stop_gradient on the mean in the variance);
  ours matches central differences.
  """
  keras.utils.set_random_seed(0)
  inputs = keras.Input((6, 6, 2), dtype="float64")
  x = keras.layers.Conv2D(3, 3, padding="same", dtype="float64")(inputs)
  x = layer_cls(epsilon=1e-5, dtype="float64")(x)
  x = keras.layers.Flatten(dtype="float64")(x)
  model = keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(x))
  kernel = model.layers[1].kernel
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(size=(4, 6, 6, 2)))
  labels = tf.constant([0, 1, 2, 1])

  def penalty():
    return fgr_tf.input_gradient_penalty(model, images, labels)[1]

  with tf.GradientTape() as tape:
    value = penalty()
  analytic = tape.gradient(value, kernel).numpy().ravel()[:4]
  numeric = []
  base = kernel.numpy()
  for i in range(4):
    for sign in (1, -1):
      shifted = base.copy()
      shifted.ravel()[i] += sign * 1e-6
      kernel.assign(shifted)
      numeric.append(penalty().numpy())
    kernel.assign(base)
  numeric = (np.array(numeric[0::2]) - np.array(numeric[1::2])) / 2e-6
  # float64: central differences with h = 1e-6 are off by ~h^2 (truncation)
  # plus ~u64 * |penalty| / h ~ 1e-10 relative (measured 6e-10 for ours);
  # Keras's layer is off by 1.3e-2. 1e-5 separates them both ways.
  matches = np.allclose(analytic, numeric, rtol=1e-5,
                        atol=1e-6 * np.abs(numeric).max())
  assert matches == (layer_cls is batch_norm.BatchNormalization), (
      analytic, numeric)
