"""CIFAR ResNet-18 (3x3 stem, no initial pooling, BasicBlocks [2, 2, 2, 2])."""

import keras

from fgr_tf import errors


def _basic_block(x, filters, strides, factory, name):
  shortcut = x
  y = factory.conv(filters, f"{name}_conv1", strides=strides,
                   use_bias=False)(x)
  y = factory.batch_norm(f"{name}_bn1")(y)
  y = factory.relu()(y)
  y = factory.conv(filters, f"{name}_conv2", use_bias=False)(y)
  y = factory.batch_norm(f"{name}_bn2")(y)
  if strides != 1 or x.shape[-1] != filters:
    shortcut = factory.conv(filters, f"{name}_proj", strides=strides,
                            kernel_size=1, use_bias=False)(x)
    shortcut = factory.batch_norm(f"{name}_proj_bn")(shortcut)
  return factory.relu()(keras.layers.Add(dtype=factory.dtype)([y, shortcut]))


def resnet18(num_classes, input_shape, factory, name="resnet18"):
  """CIFAR ResNet-18: [B, H, W, C] images -> [B, classes] logits.

  Needs H, W >= 8 (three stride-2 stages); the head is global average
  pooling and Dense(classes) (4x4 average pooling at 32x32, as the usual
  CIFAR ResNet).
  """
  if min(input_shape[0], input_shape[1]) < 8:
    raise errors.UserError("resnet18 needs images of at least 8x8. "
                     f"Received: input_shape={input_shape}")
  inputs = keras.Input(input_shape)
  x = factory.conv(64, "stem_conv", use_bias=False)(inputs)
  x = factory.batch_norm("stem_bn")(x)
  x = factory.relu()(x)
  for stage, (filters, strides) in enumerate(
      [(64, 1), (128, 2), (256, 2), (512, 2)]):
    for block in range(2):
      x = _basic_block(x, filters, strides if block == 0 else 1, factory,
                       f"stage{stage}_block{block}")
  x = keras.layers.GlobalAveragePooling2D(dtype=factory.dtype)(x)
  outputs = factory.dense(num_classes, "dense")(x)
  return keras.Model(inputs, outputs, name=name)
