"""The first layer's input gradient by a matmul (`few_channels`): equal to
TF's convolution gradients in float64, under pfor too."""

import numpy as np
import pytest
import tensorflow as tf

from fgr_tf.backbones import few_channels


def _reference(x, kernel, bias):
  return tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias)


@pytest.mark.parametrize("shape", [(3, 6, 5, 1), (2, 4, 7, 3)])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("xla", [True, False])
def test_values_and_gradients_equal_tf_conv2d_in_float64(shape, compiled,
                                                         xla):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=shape))
  kernel = tf.constant(rng.normal(size=(3, 3, shape[3], 8)))
  bias = tf.constant(rng.normal(size=8))
  cot = tf.constant(rng.normal(size=shape[:3] + (8,)))

  def value_and_grads(function):
    with tf.GradientTape() as tape:
      tape.watch([x, kernel, bias])
      y = function(x, kernel, bias)
      total = tf.reduce_sum(y * cot)
    return [y] + tape.gradient(total, [x, kernel, bias])

  ours = lambda x, k, b: few_channels.conv_with_bias(k, b, xla)(x)
  if compiled:
    ours = tf.function(ours)
  for a, b in zip(value_and_grads(ours), value_and_grads(_reference)):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0,
                               atol=1e-13 * np.abs(b.numpy()).max())
  # Not vacuous: the input gradient reaches every pixel.
  assert np.abs(value_and_grads(ours)[1].numpy()).min() > 0


def test_second_derivatives_of_the_input_gradient():
  """d/d(dy, kernel) of <input_gradient(dy, kernel), v> equals TF's."""
  rng = np.random.default_rng(1)
  dy = tf.constant(rng.normal(size=(2, 5, 6, 4)))
  kernel = tf.constant(rng.normal(size=(3, 3, 2, 4)))
  probe = tf.constant(rng.normal(size=(2, 5, 6, 2)))

  def grads(input_gradient):
    with tf.GradientTape() as tape:
      tape.watch([dy, kernel])
      total = tf.reduce_sum(input_gradient(dy, kernel) * probe)
    return tape.gradient(total, [dy, kernel])

  native = lambda dy, k: tf.nn.conv2d_transpose(dy, k, [2, 5, 6, 2], 1,
                                                "SAME")
  for ours in (few_channels.input_gradient,
               few_channels.input_gradient_by_ops):
    for a, b in zip(grads(ours), grads(native)):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0,
                                 atol=1e-13 * np.abs(b.numpy()).max())


@pytest.mark.parametrize("in_channels", [1, 3])
def test_under_pfor_the_jacobian_equals_the_loop_and_tf(in_channels):
  """ADef's `tape.jacobian` vectorizes the gradient with pfor, which
  cannot vectorize the XLA call: there it is `input_gradient_by_ops`;
  the loop (no pfor) runs the XLA form; both equal TF's convolution."""
  rng = np.random.default_rng(2)
  x = tf.constant(rng.normal(size=(2, 5, 6, in_channels)))
  kernel = tf.constant(rng.normal(size=(3, 3, in_channels, 3)))
  bias = tf.zeros([3], tf.float64)
  convs = (few_channels.conv_with_bias(kernel, bias),
           lambda x: _reference(x, kernel, bias))

  @tf.function
  def jacobians():
    out = []
    for conv, vectorize in ((convs[0], True), (convs[0], False),
                            (convs[1], False)):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(conv(x) ** 2, axis=[0, 1, 2])  # [3]
      out.append(tape.jacobian(y, x, experimental_use_pfor=vectorize))
    return out

  vectorized, looped, reference = jacobians()
  scale = np.abs(reference.numpy()).max()
  assert scale > 0.1
  for ours in (vectorized, looped):
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=0,
                               atol=1e-13 * scale)


def test_applies_to_first_layers_only():
  import keras  # pylint: disable=g-import-not-at-top
  conv = keras.layers.Conv2D(8, 3, padding="same")
  assert few_channels.applies(conv, (None, 28, 28, 1), "float32")
  assert few_channels.applies(conv, (None, 32, 32, 3), "float64")
  assert not few_channels.applies(conv, (None, 32, 32, 16), "float32")
  assert not few_channels.applies(conv, (None, None, None, 1), "float32")
  assert not few_channels.applies(conv, (None, 28, 28, 1), "bfloat16")
  strided = keras.layers.Conv2D(8, 3, strides=2, padding="same")
  assert not few_channels.applies(strided, (None, 28, 28, 1), "float32")
