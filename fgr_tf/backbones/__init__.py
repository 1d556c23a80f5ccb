"""Backbones: `build(name, num_classes, input_shape)` -> logits keras.Model."""

from fgr_tf import errors
from fgr_tf.backbones import folding
from fgr_tf.backbones import layers
from fgr_tf.backbones import resnet
from fgr_tf.backbones import small_cnn as small_cnn_lib
from fgr_tf.backbones import vgg as vgg_lib

# `images -> model(images, training=False)` with BatchNorms folded.
inference_function = folding.inference_function

NAMES = ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "small_cnn")


def build(name, num_classes, input_shape, *, dtype=None, weight_decay=0.0,
          sync_batchnorm=False):
  """Builds a backbone that maps [B, H, W, C] images in [0, 1] to logits.

  Args:
    name: one of `NAMES`.
    num_classes: number of classes (>= 2).
    input_shape: (H, W, C) of one image.
    dtype: layer dtype or mixed-precision policy name (None = global policy).
    weight_decay: PyTorch-style coupled L2 on all parameters (see
      `layers.LayerFactory`).
    sync_batchnorm: synchronize BatchNorm statistics across replicas.

  Returns:
    A functional `keras.Model` (outputs are logits).

  Raises:
    ValueError: unknown name, bad num_classes or impossible input_shape.
  """
  if name not in NAMES:
    raise errors.UserError(f"Unknown model {name!r}. Expected one of {NAMES}.")
  if int(num_classes) != num_classes or num_classes < 2:
    raise errors.UserError(
        f"num_classes must be an int >= 2. Received: num_classes={num_classes}")
  input_shape = tuple(input_shape)
  if (len(input_shape) != 3 or
      any(int(d) != d or d < 1 for d in input_shape)):
    raise errors.UserError("input_shape must be (height, width, channels) of "
                     f"positive ints. Received: input_shape={input_shape}")
  factory = layers.LayerFactory(dtype, weight_decay, sync_batchnorm)
  num_classes = int(num_classes)
  if name in vgg_lib.CFGS:
    return vgg_lib.vgg(vgg_lib.CFGS[name], num_classes, input_shape, factory,
                       name=name)
  if name == "resnet18":
    return resnet.resnet18(num_classes, input_shape, factory)
  return small_cnn_lib.small_cnn(num_classes, input_shape, factory)
