"""Input pipelines: arrays from IDX files, tfds or synthetic data -> tf.data.

Images come out NHWC float32 in [0, 1], labels int32, batched by the GLOBAL
batch size (tf.distribute splits each batch across replicas).
"""

import os

import numpy as np
import tensorflow as tf

from fgr_tf import errors
from fgr_tf import idx
from fgr_tf import synthetic

DATASETS = ("cifar10", "cifar100", "svhn_cropped", "mnist", "fashion_mnist",
            "synthetic")
SOURCES = ("idx", "tfds", "synthetic")
# The Debian package dataset-fashion-mnist installs the IDX files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Datasets whose augmentation flips horizontally (natural images); digits
# and garments are only shifted, as in the original.
_FLIP = ("cifar10", "cifar100")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10,
               "mnist": 10, "fashion_mnist": 10, "synthetic": 10}


def _find_idx(data_dir, stem):
  for name in (stem, stem + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return path
  return None


def load_idx(data_dir, split):
  """(images uint8 [N, H, W, 1], labels [N]) from MNIST-format IDX files.

  Raises:
    FileNotFoundError: with instructions, when the files are missing.
    ValueError: corrupt or mismatched files.
  """
  if split not in _IDX_FILES:
    raise errors.UserError(f"Unknown split {split!r}. Expected one of "
                           f"{sorted(_IDX_FILES)}.")
  paths = [_find_idx(data_dir, stem) for stem in _IDX_FILES[split]]
  if None in paths:
    missing = [s for s, p in zip(_IDX_FILES[split], paths) if p is None]
    raise errors.DataNotFoundError(
        f"MNIST-format IDX files {missing} (optionally .gz) not found in "
        f"{data_dir!r}. For Fashion-MNIST on Debian/Ubuntu run "
        "`sudo apt-get install dataset-fashion-mnist` (installs them in "
        f"{FASHION_MNIST_DIR}), or download them and set "
        "--config.data.data_dir, or use --config.data.source=tfds.")
  images, labels = idx.read_idx(paths[0]), idx.read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise errors.UserError(f"IDX files in {data_dir!r} do not match: images "
                           f"{images.shape}, labels {labels.shape}.")
  return images[..., None], labels.astype(np.int32)


def load_tfds(name, split, data_dir=None):
  """(images uint8 NHWC, labels) of a tensorflow-datasets data set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    images, labels = tfds.as_numpy(tfds.load(
        name, split=split, data_dir=data_dir, as_supervised=True,
        batch_size=-1))
  except Exception as e:  # tfds raises many types; say what to do.
    raise errors.DataNotFoundError(
        f"Could not load tfds data set {name!r} (split {split!r}, data_dir "
        f"{data_dir!r}): {e}. tfds downloads it on first use (needs a "
        "network); or prepare it elsewhere and copy its data_dir.") from e
  return images, labels.astype(np.int32)


def _example_count(num_examples):
  """None or -1 -> None (all); an int >= 1 -> itself; else ValueError."""
  is_int = (isinstance(num_examples, (int, np.integer)) and
            not isinstance(num_examples, bool))
  if num_examples is None or (is_int and num_examples == -1):
    return None
  if not is_int or num_examples < 1:
    raise errors.UserError(
        "num_examples must be an int >= 1, or -1 or None for all examples. "
        f"Received: num_examples={num_examples}")
  return int(num_examples)


def load(name, split, source=None, data_dir=None, num_examples=None):
  """Loads a split as numpy arrays (images uint8 or float, labels int32).

  Args:
    name: one of DATASETS.
    split: "train" or "test".
    source: "idx" (MNIST-format files in data_dir; default for
      fashion_mnist, from the Debian package's directory), "tfds" (default
      for the others) or "synthetic" (`fgr_tf.synthetic.shapes`).
    data_dir: directory of the IDX files or tfds data.
    num_examples: keep the first N examples (an int >= 1); None or -1 =
      all (the configs' `-1 = all`).

  Raises:
    ValueError: unknown name or source, or num_examples not None, -1 or an
      int >= 1.
  """
  num_examples = _example_count(num_examples)
  if name not in DATASETS:
    raise errors.UserError(f"Unknown dataset {name!r}. Expected one of "
                           f"{DATASETS}.")
  if source is None:
    source = {"fashion_mnist": "idx", "synthetic": "synthetic"}.get(name,
                                                                    "tfds")
  if source not in SOURCES:
    raise errors.UserError(f"Unknown data source {source!r}. Expected one of "
                           f"{SOURCES}.")
  if source == "synthetic":
    count = num_examples or (4096 if split == "train" else 1024)
    images, labels = synthetic.shapes(count, seed=0 if split == "train" else 1)
  elif source == "idx":
    if data_dir is None:
      data_dir = FASHION_MNIST_DIR
    images, labels = load_idx(data_dir, split)
  else:
    images, labels = load_tfds(name, split, data_dir)
  if num_examples is not None:
    images, labels = images[:num_examples], labels[:num_examples]
  return images, labels


def to_unit_float(images):
  """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32) / 255.0
  return tf.cast(images, tf.float32)


def augment(image, seed, flip, pad=4):
  """The original's augmentation: pad by `pad`, random crop, optional flip.

  Zero padding (torchvision's RandomCrop(padding=4)). Stateless, seeded.
  """
  height, width = image.shape[0], image.shape[1]
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seed + 1)
  return tf.ensure_shape(image, [height, width, image.shape[-1]])


def augment_seeds(seed):
  """An endless dataset of [2] int32 stateless seeds in [0, 2^31), one per
  example (reduced in int64, then cast: int32 cannot hold 2^31)."""
  return tf.data.Dataset.random(seed=seed).batch(2).map(
      lambda s: tf.cast(s % tf.constant(2**31, tf.int64), tf.int32))


def make_dataset(images, labels, batch_size, train, dataset_name="synthetic",
                 augment_data=True, seed=0):
  """tf.data pipeline: normalize, (shuffle, augment,) batch, prefetch.

  Args:
    images: [N, H, W, C] uint8 (0-255) or float (0-1).
    labels: [N] ints.
    batch_size: the GLOBAL batch size.
    train: shuffle each epoch and augment.
    dataset_name: decides the flip (CIFAR only).
    augment_data: False disables augmentation even when training.
    seed: shuffle and augmentation seed.
  """
  if batch_size < 1:
    raise errors.UserError(f"batch_size must be >= 1. Received: {batch_size}")
  flip = dataset_name in _FLIP
  dataset = tf.data.Dataset.from_tensor_slices((images, labels))
  if train:
    dataset = dataset.shuffle(len(images), seed=seed,
                              reshuffle_each_iteration=True)
  dataset = dataset.map(lambda x, y: (to_unit_float(x), tf.cast(y, tf.int32)),
                        num_parallel_calls=tf.data.AUTOTUNE)
  if train and augment_data:
    dataset = tf.data.Dataset.zip((dataset, augment_seeds(seed))).map(
        lambda xy, s: (augment(xy[0], s, flip), xy[1]),
        num_parallel_calls=tf.data.AUTOTUNE)
  # tf.data's autotuner off: with it, `fit` ran every other model at ~60%
  # speed on 2 cores (the training step got ~1.2 cores; 5 of 8 fresh
  # models against 0 of 12 with it off; docs/PERFORMANCE.md). This
  # pipeline delivers >10,000 images/s either way.
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.batch(batch_size).prefetch(2).with_options(options)
