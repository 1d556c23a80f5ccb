"""Early, clear errors for bad images and labels.

Every public entry point that takes a batch (FGRModel.fit, the attacks,
evaluation) checks it here: shapes and dtypes always, values when they are
concrete (NumPy arrays or eager tensors). Batches that arrive while
training (a tf.data pipeline, a keras.utils.PyDataset, a Python generator)
are checked by `checked_batches` BEFORE they enter the compiled training
step: XLA (the GPU default) drops assertion ops, so checks inside the step
would not run there.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

from fgr_tf import errors


def _is_concrete(x):
  return isinstance(x, np.ndarray) or (isinstance(x, tf.Tensor) and
                                       hasattr(x, "numpy"))


def model_shape(model):
  """(channels or None, classes or None) a Keras classifier expects."""
  channels = classes = None
  try:
    channels = model.input_shape[-1]
  except (AttributeError, ValueError, TypeError):
    pass
  try:
    classes = model.output_shape[-1]
  except (AttributeError, ValueError, TypeError):
    pass
  return channels, classes


def check_images(images, where, channels=None):
  """Validates a batch of images [B, H, W, C], float in [0, 1].

  Args:
    images: array or tensor.
    where: the caller's name, put at the front of error messages.
    channels: the expected C, or None.

  Returns:
    `images` as a tensor (dtype unchanged).

  Raises:
    ValueError: wrong rank, channels, dtype (uint8 or other integers: the
      message says to divide by 255), NaN/Inf, or values outside [0, 1].
  """
  concrete = _is_concrete(images)
  images = tf.convert_to_tensor(images)
  expected = ("float images of shape [batch, height, width, channels] with "
              "values in [0, 1]")
  if images.shape.rank != 4:
    raise errors.UserError(f"{where} expects {expected}. Received: shape="
                           f"{images.shape} (rank {images.shape.rank}).")
  if not images.dtype.is_floating:
    hint = (" Convert with fgr_tf.data.to_unit_float(images) (divides by "
            "255)." if images.dtype.is_integer else "")
    raise errors.UserError(f"{where} expects {expected}. Received: dtype="
                           f"{images.dtype.name}.{hint}")
  if channels is not None and images.shape[-1] not in (None, channels):
    raise errors.UserError(f"{where}: the model expects {channels} channels. "
                           f"Received: shape={images.shape}.")
  if concrete and images.shape.num_elements():
    values = images.numpy()
    if not np.isfinite(values).all():
      raise errors.UserError(f"{where}: images contain NaN or Inf "
                             f"({int((~np.isfinite(values)).sum())} values).")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
      hint = (" They look like 0-255 pixel values: divide by 255."
              if high > 1.0 and high <= 255.0 and low >= 0.0 else "")
      raise errors.UserError(
          f"{where} expects image values in [0, 1]. Received: min {low:g}, "
          f"max {high:g}.{hint}")
  return images


def check_labels(labels, where, num_classes=None, batch=None):
  """Validates integer class labels [B] (or [B, 1]) in [0, num_classes).

  Returns:
    `labels` as a tensor of shape [B].
  """
  concrete = _is_concrete(labels)
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank == 2 and labels.shape[1] == 1:  # keras.datasets style
    labels = tf.reshape(labels, [-1])
  if labels.shape.rank != 1 or not labels.dtype.is_integer:
    raise errors.UserError(f"{where} expects integer labels of shape [batch]. "
                           f"Received: shape={labels.shape}, dtype="
                           f"{labels.dtype.name}.")
  if batch is not None and labels.shape[0] not in (None, batch):
    raise errors.UserError(f"{where}: {batch} images but {labels.shape[0]} "
                           "labels.")
  if concrete and num_classes and labels.shape.num_elements():
    values = labels.numpy()
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
      raise errors.UserError(
          f"{where}: labels must be in [0, {num_classes}) for a model with "
          f"{num_classes} classes. Received: min {low}, max {high}.")
  return labels


def image_assertions(images, where, hint=""):
  """Runtime checks for a compiled function: finite images in [0, 1].
  Returns the assertion ops (for tf.control_dependencies)."""
  return [
      tf.debugging.assert_all_finite(
          images, f"{where}: images contain NaN or Inf"),
      tf.debugging.assert_greater_equal(
          tf.reduce_min(images), tf.cast(0.0, images.dtype),
          message=f"{where}: image values must be in [0, 1] (min < 0){hint}"),
      tf.debugging.assert_less_equal(
          tf.reduce_max(images), tf.cast(1.0, images.dtype),
          message=f"{where}: image values must be in [0, 1] (max > 1; "
                  f"0-255 pixels? divide by 255){hint}"),
  ]


def label_assertions(labels, where, num_classes):
  """Runtime checks: labels in [0, num_classes). Returns the assertion ops."""
  return [
      tf.debugging.assert_non_negative(
          labels, message=f"{where}: labels must be >= 0"),
      tf.debugging.assert_less(
          tf.cast(labels, tf.int64), tf.cast(num_classes, tf.int64),
          message=f"{where}: labels must be < {num_classes} (the number "
                  "of classes)"),
  ]


def graph_assertions(images, labels, num_classes):
  """Runtime checks for a compiled training step: finite images in [0, 1],
  labels in [0, num_classes). Returns the assertion ops (dropped by XLA:
  see `checked_batches`)."""
  checks = image_assertions(images, "FGRModel")
  if num_classes:
    checks += label_assertions(labels, "FGRModel", num_classes)
  return checks


def _split_batch(batch):
  """(images, labels or None) of a batch: a tensor/array, or a tuple
  (images, labels[, sample_weight])."""
  if isinstance(batch, (tuple, list)):
    return batch[0], (batch[1] if len(batch) > 1 else None)
  return batch, None


def _check_batch(batch, where, channels, classes):
  images, labels = _split_batch(batch)
  images = check_images(images, where, channels)
  if labels is not None:
    check_labels(labels, where, classes, batch=images.shape[0])
  return batch


class _CheckedPyDataset(keras.utils.PyDataset):
  """A keras.utils.PyDataset whose batches are checked as they are read."""

  def __init__(self, inner, check):
    super().__init__(workers=inner.workers,
                     use_multiprocessing=inner.use_multiprocessing,
                     max_queue_size=inner.max_queue_size)
    self._inner = inner
    self._check = check

  def __len__(self):
    return len(self._inner)

  @property
  def num_batches(self):
    return self._inner.num_batches

  def __getitem__(self, index):
    return self._check(self._inner[index])

  def on_epoch_begin(self):
    self._inner.on_epoch_begin()

  def on_epoch_end(self):
    self._inner.on_epoch_end()


def checked_batches(data, where, channels=None, classes=None):
  """`data` whose every batch is checked before a training step sees it.

  Args:
    data: a tf.data.Dataset, keras.utils.PyDataset or Python generator of
      batches `images` or `(images, labels[, sample_weight])`; anything
      else is returned unchanged (arrays are checked whole by the caller).
    where: the caller's name, put at the front of error messages.
    channels, classes: what the model expects (or None).

  Returns:
    (data, checked): the wrapped data, and whether it could be wrapped.
    A tf.data pipeline gets assertion ops in a `map` (they run in tf.data,
    never under XLA; a bad batch raises InvalidArgumentError naming the
    problem); the others are checked in Python, as `check_images` /
    `check_labels`.
  """
  if isinstance(data, tf.data.Dataset):
    def check(*components):  # tf.data passes a tuple element's parts
      images = check_images(components[0], where, channels)
      checks = image_assertions(images, where)
      if len(components) > 1 and classes:
        checks += label_assertions(
            check_labels(components[1], where, classes), where, classes)
      with tf.control_dependencies(checks):
        images = tf.identity(images)
      return (images,) + components[1:] if len(components) > 1 else images

    return data.map(check), True
  check = lambda batch: _check_batch(batch, where, channels, classes)
  if isinstance(data, keras.utils.PyDataset):
    return _CheckedPyDataset(data, check), True
  if inspect.isgenerator(data):
    return (check(batch) for batch in data), True
  return data, False
