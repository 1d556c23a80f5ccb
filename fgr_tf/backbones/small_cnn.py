"""A small CNN sized for 28x28 inputs (MNIST / Fashion-MNIST)."""

import keras

from fgr_tf import errors


def small_cnn(num_classes, input_shape, factory, name="small_cnn"):
  """conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, Dense(128)-ReLU, Dense(classes).

  About 0.4M parameters at 28x28x1; needs H, W >= 4. Returns logits.
  """
  if min(input_shape[0], input_shape[1]) < 4:
    raise errors.UserError("small_cnn needs images of at least 4x4. "
                     f"Received: input_shape={input_shape}")
  inputs = keras.Input(input_shape)
  x = inputs
  for index, filters in enumerate((32, 64)):
    x = factory.conv(filters, f"conv{index}")(x)
    x = factory.batch_norm(f"bn{index}")(x)
    x = factory.relu()(x)
    x = factory.max_pool()(x)
  x = keras.layers.Flatten(dtype=factory.dtype)(x)
  x = factory.relu()(factory.dense(128, "fc")(x))
  outputs = factory.dense(num_classes, "dense")(x)
  return keras.Model(inputs, outputs, name=name)
