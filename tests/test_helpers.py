"""The test helpers are what their names say."""

import math

import keras
import numpy as np
import pytest

from helpers import U32, assert_close_float32, float32_tolerance
from helpers import no_bn_model


def _batch_norm_layers(model):
  return [layer for layer in model.layers
          if isinstance(layer, keras.layers.BatchNormalization) or
          "BatchNorm" in type(layer).__name__]


def test_no_bn_model_has_no_batch_norm():
  model = no_bn_model()
  assert not _batch_norm_layers(model)
  assert not any("moving" in v.path for v in model.variables)
  assert model.input_shape == (None, 8, 8, 2)
  assert model.output_shape == (None, 3)
  assert all(v.dtype == "float64" for v in model.variables)


def test_float32_tolerance_is_factor_u_sqrt_reduction_depth_scale():
  assert float32_tolerance(2.0, 100, depth=3, factor=10) == pytest.approx(
      10 * 2.0 ** -24 * 10 * 3 * 2.0, rel=1e-12)


def test_assert_close_float32_bound_and_message():
  expected = np.array([[4.0, -1.0], [0.5, 2.0]])
  bound = float32_tolerance(4.0, 64, depth=2)
  assert_close_float32(expected + [[0, 0.99 * bound], [0, 0]], expected, 64, 2)
  with pytest.raises(AssertionError) as error:
    assert_close_float32(expected + [[0, 0], [0, 1.5 * bound]], expected,
                         64, 2, err_msg="conv0/kernel")
  message = str(error.value)
  for part in (f"{1.5 * bound:.3e}", f"bound {bound:.3e}", "factor 10.0",
               f"u {U32:.3e}", "sqrt(reduction 64) 8", "depth 2",
               "scale 4.000e+00", "at (1, 1)", "error / bound = 1.50",
               "conv0/kernel"):
    assert part in message, (part, message)


def test_assert_close_float32_scale_nan_and_shape():
  # A zero in exact arithmetic: the scale of the summed terms is given.
  assert_close_float32([1e-6], [0.0], 512, scale=10.0)
  with pytest.raises(AssertionError, match="scale 0.000e"):
    assert_close_float32([1e-6], [0.0], 512)
  with pytest.raises(AssertionError, match="nan"):
    assert_close_float32([1.0, math.nan], [1.0, 1.0], 4)
  with pytest.raises(AssertionError, match="shapes differ"):
    assert_close_float32(np.ones(3), np.ones((3, 1)), 4)
