"""The test helpers are what their names say."""

import keras

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
