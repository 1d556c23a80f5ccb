"""The original's CIFAR VGG: [conv3x3 + BN + ReLU]* with 2x2 max-pools, Dense head."""

import keras

from fgr_tf import errors

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512,
              512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512,
              "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512,
              512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg(cfg, num_classes, input_shape, factory, name="vgg"):
  """Builds a CIFAR-style VGG from a cfg list (ints = conv widths, "M" = pool).

  Layers are named conv{i}, bn{i} (i counts convolutions) and dense, so the
  weights of the original's VGG can be loaded by name. With a 32x32 input
  the five pools leave 1x1x512 features and the head is the original's
  Linear(512, classes).

  Args:
    cfg: list of ints and "M".
    num_classes: number of logits.
    input_shape: (H, W, C); H and W must survive the pools (>= 2^pools).
    factory: a `layers.LayerFactory`.

  Returns:
    A functional keras.Model mapping [B, H, W, C] images to [B, classes]
    logits.
  """
  pools = sum(1 for v in cfg if v == "M")
  if min(input_shape[0], input_shape[1]) < 2 ** pools:
    raise errors.UserError(
        f"{name} has {pools} 2x2 max-pools and needs images of at least "
        f"{2 ** pools}x{2 ** pools}. Received: input_shape={input_shape}")
  inputs = keras.Input(input_shape)
  x = inputs
  conv_index = 0
  for value in cfg:
    if value == "M":
      x = factory.max_pool()(x)
    else:
      x = factory.conv(int(value), f"conv{conv_index}")(x)
      x = factory.batch_norm(f"bn{conv_index}")(x)
      x = factory.relu()(x)
      conv_index += 1
  x = keras.layers.Flatten(dtype=factory.dtype)(x)
  outputs = factory.dense(num_classes, "dense")(x)
  return keras.Model(inputs, outputs, name=name)
