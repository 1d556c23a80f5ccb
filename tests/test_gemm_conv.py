"""3x3 convolutions on small maps as a matmul: same values and derivatives."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fgr_tf.backbones import gemm_conv
from fgr_tf.backbones import winograd
from helpers import UBF16, assert_close_float32


def _derivatives(conv, x, kernel, upstream):
  """(y, dy/dx . up, dy/dkernel . up, d||dx||^2/dkernel, d||dx||^2/dx)."""
  with tf.GradientTape(persistent=True) as outer:
    outer.watch([x, kernel])
    with tf.GradientTape() as inner:
      inner.watch([x, kernel])
      y = conv(x, kernel)
      loss = tf.reduce_sum(tf.square(y) * upstream)
    dx, dkernel = inner.gradient(loss, [x, kernel])
    penalty = tf.reduce_sum(tf.square(dx))
  return [y, dx, dkernel, outer.gradient(penalty, kernel),
          outer.gradient(penalty, x)]


@pytest.mark.parametrize("shape,out_channels", [
    ((2, 2, 2, 5), 3), ((3, 4, 4, 2), 6), ((2, 1, 3, 4), 2), ((1, 5, 2, 3), 4),
    ((3, 1, 1, 3), 2), ((2, 1, 4, 3), 5), ((2, 4, 1, 2), 3),
    ((2, 6, 4, 3), 4), ((1, 2, 8, 2), 3), ((2, 8, 8, 3), 4)])
@pytest.mark.parametrize("use_winograd", [True, False])
def test_conv3x3_same_equals_conv2d_with_first_and_second_derivatives(
    shape, out_channels, use_winograd):
  _assert_equals_conv2d(
      lambda a, k: gemm_conv.conv3x3_same(a, k, use_winograd), shape,
      out_channels)


def _assert_equals_conv2d(conv, shape, out_channels, seed=0):
  """conv(x, kernel): values, first and second derivatives equal
  tf.nn.conv2d's in float64."""
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=shape))
  kernel = tf.constant(rng.normal(size=(3, 3, shape[-1], out_channels)))
  upstream = tf.constant(rng.normal(size=shape[:3] + (out_channels,)))
  ours = _derivatives(conv, x, kernel, upstream)
  reference = _derivatives(lambda a, k: tf.nn.conv2d(a, k, 1, "SAME"), x,
                           kernel, upstream)
  for name, a, b in zip(["y", "dx", "dkernel", "d2 kernel", "d2 x"], ours,
                        reference):
    # float64 on both sides; sums of <= 3 * 3 * 6 or 3 * 4 * 4 terms, 4
    # chained: round-off ~1e-14 of values of order 1-100.
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("shape,out_channels", [
    ((3, 4, 4, 2), 6), ((2, 6, 4, 3), 4), ((1, 2, 8, 2), 3)])
def test_prepared_winograd_equals_conv2d_with_first_and_second_derivatives(
    shape, out_channels):
  """`winograd.prepared` (the kernel's transforms computed once, for attack
  loops): values and derivatives, the kernel's through its transforms."""
  _assert_equals_conv2d(lambda a, k: winograd.prepared(k)(a), shape,
                        out_channels, seed=1)


def test_prepared_convolution_op_runs_prepared_winograd_on_its_shape():
  """The layer's prepared op without XLA (batches that vary): Winograd's
  matrix form with the transforms done, for the shape it was prepared
  for; any other input: `convolution_op`."""
  layer = gemm_conv.Conv2D(4, 3, padding="same", dtype="float64")
  layer.build((None, 4, 4, 2))
  kernel = tf.constant(np.random.default_rng(2).normal(size=(3, 3, 2, 4)))
  call = layer.prepared_convolution_op(kernel, (None, 4, 4, 2), xla=False)
  rng = np.random.default_rng(3)
  for shape in [(2, 4, 4, 2), (2, 8, 8, 2)]:
    x = tf.constant(rng.normal(size=shape))
    np.testing.assert_allclose(call(x), tf.nn.conv2d(x, kernel, 1, "SAME"),
                               rtol=1e-10, atol=1e-10)

  def input_gradient(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = call(x)
    return tape.gradient(y, x)

  graph = tf.function(input_gradient).get_concrete_function(
      tf.TensorSpec((None, 4, 4, 2), tf.float64)).graph
  types = [op.type for op in graph.get_operations()]
  # Winograd forward and backward; the flipped kernel and both kernel
  # transforms were computed at preparation: no flip in the graph.
  assert "BatchMatMulV2" in types and "ReverseV2" not in types


def _op_types(layer, shape):
  fn = tf.function(lambda x: layer(x))
  graph = fn.get_concrete_function(tf.TensorSpec((None,) + shape)).graph
  return {op.type for op in graph.get_operations()}


def test_layer_takes_the_matmul_path_only_on_small_maps():
  layer = gemm_conv.Conv2D(8, 3, padding="same")
  assert "MatMul" in _op_types(layer, (4, 4, 3))  # 16 pixels
  assert "Conv2D" not in _op_types(layer, (4, 4, 3))
  assert "Conv2D" in _op_types(gemm_conv.Conv2D(8, 3, padding="same"),
                               (8, 8, 3))
  strided = gemm_conv.Conv2D(8, 3, strides=2, padding="same")
  assert "Conv2D" in _op_types(strided, (4, 4, 3))


@pytest.mark.bfloat16_kernels
def test_layer_with_unknown_batch_and_mixed_precision():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(5, 2, 2, 3)).astype(np.float32)
  layer = gemm_conv.Conv2D(4, 3, padding="same", dtype="mixed_bfloat16")
  fn = tf.function(lambda x: layer(x),
                   input_signature=[tf.TensorSpec((None, 2, 2, 3))])
  out = fn(images)
  assert out.shape == (5, 2, 2, 4) and out.dtype == tf.bfloat16

  def bf16(x):
    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32)

  # The policy rounds inputs and weights to bfloat16 (expected too), then
  # accumulates the 27 products in float32 (negligible here) and rounds
  # the sum and its sum with the bias to bfloat16: 2 bfloat16 roundings.
  expected = tf.nn.conv2d(bf16(images), bf16(layer.kernel), 1, "SAME") + \
      bf16(layer.bias)
  assert_close_float32(tf.cast(out, tf.float32), expected, reduction=1,
                       depth=2, unit_roundoff=UBF16)


def test_layer_round_trips_through_keras_saving(tmp_path):
  inputs = keras.Input((2, 2, 3))
  model = keras.Model(inputs, gemm_conv.Conv2D(4, 3, padding="same")(inputs))
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert isinstance(loaded.layers[-1], gemm_conv.Conv2D)
  x = np.ones((1, 2, 2, 3), np.float32)
  # One conv: sums of 3 * 3 * 3 products.
  assert_close_float32(loaded(x), model(x), reduction=27)


def test_the_paths_can_be_forced_from_the_environment():
  code = ("from fgr_tf.backbones import gemm_conv; "
          "print(gemm_conv.Conv2D.GEMM_MAX_PIXELS, "
          "gemm_conv.Conv2D.WINOGRAD)")
  for pixels, winograd in (("0", "0"), ("64", "1")):
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True,
        text=True, env=dict(os.environ, FGR_TF_GEMM_MAX_PIXELS=pixels,
                            FGR_TF_WINOGRAD=winograd,
                            TF_CPP_MIN_LOG_LEVEL="3")).stdout
    assert out.split()[-2:] == [pixels, str(winograd == "1")]


def test_winograd_takes_even_float_maps_only(monkeypatch):
  def batch_matmuls(layer, shape):  # Winograd's 16 products per tile
    fn = tf.function(lambda x: layer(x))
    graph = fn.get_concrete_function(tf.TensorSpec((None,) + shape)).graph
    return [op for op in graph.get_operations()
            if op.type.startswith("BatchMatMul")]

  assert batch_matmuls(gemm_conv.Conv2D(8, 3, padding="same"), (4, 4, 3))
  assert not batch_matmuls(gemm_conv.Conv2D(8, 3, padding="same"),
                           (3, 5, 3))  # odd: im2col
  assert not batch_matmuls(gemm_conv.Conv2D(8, 3, padding="same"),
                           (2, 2, 3))  # tap blocks
  assert not batch_matmuls(
      gemm_conv.Conv2D(8, 3, padding="same", dtype="mixed_bfloat16"),
      (4, 4, 3))
  monkeypatch.setattr(gemm_conv.Conv2D, "WINOGRAD", False)
  assert not batch_matmuls(gemm_conv.Conv2D(8, 3, padding="same"), (4, 4, 3))


@pytest.mark.parametrize("shape,out_channels", [
    ((3, 4, 4, 2), 6), ((2, 6, 4, 3), 4), ((1, 2, 8, 2), 3),
    ((2, 8, 8, 5), 4)])
def test_prepared_winograd_by_xla_equals_conv2d_with_derivatives(
    shape, out_channels):
  """`winograd.prepared_by_xla` (the attacks' 8x8 maps: the transforms
  as XLA computations): values, first and second derivatives."""
  _assert_equals_conv2d(lambda a, k: winograd.prepared_by_xla(k)(a), shape,
                        out_channels, seed=4)


@pytest.mark.parametrize("size,without_xla", [(8, "Conv2D"),
                                               (4, "BatchMatMulV2")])
def test_prepared_convolution_op_takes_xla_winograd_on_4x4_and_8x8_maps(
    monkeypatch, size, without_xla):
  """The attacks' 4x4 and 8x8 layers: Winograd with XLA transforms (an XLA
  function call in the graph, no Conv2D, no matrix transforms), equal to
  conv2d; with XLA_WINOGRAD_MAX_PIXELS = 0 or xla=False, oneDNN's Conv2D
  (8x8) or Winograd's matrix form (4x4)."""
  rng = np.random.default_rng(5)
  kernel = tf.constant(rng.normal(size=(3, 3, 4, 6)))
  x = tf.constant(rng.normal(size=(2, size, size, 4)))
  shape = (None, size, size, 4)
  for max_pixels, xla in ((64, True), (0, True), (64, False)):
    monkeypatch.setattr(gemm_conv.Conv2D, "XLA_WINOGRAD_MAX_PIXELS",
                        max_pixels)
    layer = gemm_conv.Conv2D(6, 3, padding="same", dtype="float64")
    layer.build(shape)
    call = layer.prepared_convolution_op(kernel, shape, xla=xla)
    np.testing.assert_allclose(call(x), tf.nn.conv2d(x, kernel, 1, "SAME"),
                               rtol=1e-10, atol=1e-10)
    graph = tf.function(call).get_concrete_function(
        tf.TensorSpec(shape, tf.float64)).graph
    types = {op.type for op in graph.get_operations()}
    by_xla = max_pixels == 64 and xla
    assert ("PartitionedCall" in types) == by_xla
    assert (without_xla in types) == (not by_xla)
