"""SavedModel export for serving.

Signatures (images NHWC, the training image size):
  serving_default(images: float32 in [0, 1]) -> {probabilities, classes}
  serving_uint8(images: uint8 in [0, 255])   -> {probabilities, classes}
Wrong dtypes are rejected by the signature itself, wrong shapes (rank,
size, channels) and float values outside [0, 1] (e.g. 0-255 floats) or NaN
with an InvalidArgumentError that says so.
"""

import os
import shutil

import keras
import tensorflow as tf

from fgr_tf import errors
from fgr_tf import validation


def _predict(backbone, images):
  logits = tf.cast(backbone(images, training=False), tf.float32)
  return {"probabilities": tf.nn.softmax(logits),
          "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}


def _check_shape(images, shape):
  # A loaded signature does not check shapes itself, and a convolution
  # silently accepts a multiple of its channels (grouped convolution).
  return tf.ensure_shape(images, shape, name="check_image_shape")


def _serve_float(backbone, images, shape):
  images = _check_shape(images, shape)
  checks = validation.image_assertions(
      images, "serving_default",
      hint=" (or use the serving_uint8 signature for 0-255 uint8)")
  with tf.control_dependencies(checks):
    return _predict(backbone, tf.identity(images))


def _serve_uint8(backbone, images, shape):
  images = _check_shape(images, shape)
  return _predict(backbone, tf.cast(images, tf.float32) / 255.0)


def export_saved_model(model, export_dir, input_shape=None):
  """Writes a SavedModel with float32 and uint8 signatures, atomically.

  Built with `keras.export.ExportArchive`, so TF Serving and
  `saved_model_cli run` (TF1-style loading) both work.

  Args:
    model: a Keras classifier returning logits (FGRModel or backbone).
    export_dir: output directory (replaced if it exists).
    input_shape: (H, W, C); default the model's input shape.

  Returns:
    export_dir.
  """
  backbone = getattr(model, "backbone", model)
  if input_shape is None:
    input_shape = tuple(backbone.input_shape[1:])
  if len(input_shape) != 3 or None in input_shape:
    raise errors.UserError("input_shape must be a fully known (height, width, "
                           f"channels). Received: input_shape={input_shape}")
  shape = [None, *input_shape]
  archive = keras.export.ExportArchive()
  archive.track(backbone)
  archive.add_endpoint(
      "serving_default", lambda images: _serve_float(backbone, images, shape),
      input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
  archive.add_endpoint(
      "serving_uint8", lambda images: _serve_uint8(backbone, images, shape),
      input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")])
  export_dir = os.path.abspath(export_dir)
  tmp = export_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  archive.write_out(tmp, verbose=False)
  if os.path.exists(export_dir):
    shutil.rmtree(export_dir)
  os.replace(tmp, export_dir)
  return export_dir
