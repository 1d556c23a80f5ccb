"""Input pipelines on tiny IDX files the test writes."""

import gzip
import struct

import numpy as np
import pytest
import tensorflow as tf

from fgr_tf import data
from fgr_tf import idx
from helpers import assert_close_float32


def write_idx(path, array, compress=False):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(payload)


@pytest.fixture
def idx_dir(tmp_path):
  rng = np.random.default_rng(0)
  for split, (images_name, labels_name) in data._IDX_FILES.items():
    n = 20 if split == "train" else 8
    write_idx(tmp_path / (images_name + ".gz"),
              rng.integers(0, 256, (n, 28, 28)), compress=True)
    write_idx(tmp_path / labels_name, rng.integers(0, 10, n))
  return tmp_path


def test_load_idx_reads_plain_and_gzipped_files(idx_dir):
  images, labels = data.load("fashion_mnist", "train", data_dir=str(idx_dir))
  assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (20,) and labels.dtype == np.int32
  test_images, _ = data.load("fashion_mnist", "test", data_dir=str(idx_dir),
                             num_examples=5)
  assert len(test_images) == 5


def test_missing_data_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="apt-get install dataset-fashion-mnist"):
    data.load("fashion_mnist", "train", data_dir=str(tmp_path))


def test_truncated_idx_is_reported(tmp_path):
  path = tmp_path / "x-idx3-ubyte"
  write_idx(path, np.zeros((4, 5, 5)))
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(ValueError, match="truncated"):
    idx.read_idx(str(path))
  path.write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    idx.read_idx(str(path))


def test_unknown_dataset_and_source():
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
    data.load("imagenet", "train")
  with pytest.raises(ValueError, match="Unknown data source 'ftp'"):
    data.load("mnist", "train", source="ftp")


def test_pipeline_normalizes_batches_and_augments(idx_dir):
  images, labels = data.load("fashion_mnist", "train", data_dir=str(idx_dir))
  train = data.make_dataset(images, labels, 8, train=True,
                            dataset_name="fashion_mnist", seed=1)
  batches = list(train)
  assert [len(b[0]) for b in batches] == [8, 8, 4]
  x, y = batches[0]
  assert x.dtype == tf.float32 and y.dtype == tf.int32
  assert x.shape[1:] == (28, 28, 1)
  assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
  # Shuffled and augmented (crop after 4-pixel zero padding): the batch
  # differs from the plain test pipeline, but keeps the label multiset.
  plain = data.make_dataset(images, labels, 20, train=False)
  x_plain, y_plain = next(iter(plain))
  # One float32 division by 255 (2 roundings if done as a product with a
  # rounded 1 / 255); no sums.
  assert_close_float32(x_plain, images / 255.0, reduction=1, depth=2)
  all_labels = np.concatenate([b[1] for b in batches])
  assert sorted(all_labels) == sorted(y_plain.numpy())
  augmented = np.concatenate([b[0] for b in batches])
  # Crops bring in padding zeros: the sorted values move by whole
  # intensity steps (>= 1 / 255), far beyond allclose's default 1e-5.
  assert not np.allclose(np.sort(augmented.ravel()),
                         np.sort(x_plain.numpy().ravel()))


def test_pipeline_runs_without_the_tf_data_autotuner():
  """With the autotuner on, `fit` ran at ~60% speed for some models
  (docs/PERFORMANCE.md); the pipeline turns it off, for train and test."""
  images = np.zeros((4, 8, 8, 1), np.uint8)
  for train in (True, False):
    dataset = data.make_dataset(images, np.zeros(4, int), 2, train=train)
    assert dataset.options().autotune.enabled is False
    assert len(list(dataset)) == 2


def test_augment_crop_and_flip():
  image = tf.reshape(tf.range(6 * 6, dtype=tf.float32), [6, 6, 1])
  out = data.augment(image, tf.constant([3, 4]), flip=False, pad=0)
  np.testing.assert_array_equal(out, image)
  flips = [data.augment(image, tf.constant([s, 0]), flip=True, pad=0)
           for s in range(8)]
  assert any(np.array_equal(f, image[:, ::-1]) for f in flips)
  assert any(np.array_equal(f, image) for f in flips)
  shifted = data.augment(image, tf.constant([5, 6]), flip=False, pad=2)
  assert shifted.shape == (6, 6, 1)


def test_synthetic_source_is_deterministic():
  a = data.load("synthetic", "train", num_examples=10)
  b = data.load("synthetic", "train", num_examples=10)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[0].shape == (10, 28, 28, 1) and a[0].dtype == np.float32


def test_num_examples_minus_one_or_none_means_all(idx_dir):
  for count in (None, -1):
    images, labels = data.load("fashion_mnist", "test",
                               data_dir=str(idx_dir), num_examples=count)
    assert len(images) == len(labels) == 8, count
  assert len(data.load("synthetic", "test", num_examples=-1)[0]) == 1024
  assert len(data.load("synthetic", "test", num_examples=3)[0]) == 3


@pytest.mark.parametrize("count", [0, -2, 2.5, True])
def test_bad_num_examples_are_named(idx_dir, count):
  with pytest.raises(ValueError, match=f"num_examples={count}"):
    data.load("fashion_mnist", "test", data_dir=str(idx_dir),
              num_examples=count)


def test_training_and_evaluation_read_all_examples_for_minus_one(
    idx_dir, tmp_path):
  # pylint: disable=g-import-not-at-top
  import keras
  from fgr_tf import backbones
  from fgr_tf.experiment import evaluate
  from fgr_tf.experiment import train
  from fgr_tf.experiment.configs import smoke
  config = smoke.get_config()
  config.data.name = "fashion_mnist"
  config.data.source = "idx"
  config.data.data_dir = str(idx_dir)
  config.data.num_train_examples = config.data.num_val_examples = -1
  (train_x, _), (val_x, _) = train.load_splits(config)
  assert (len(train_x), len(val_x)) == (20, 8)
  keras.utils.set_random_seed(0)
  backbones.build("small_cnn", 10, (28, 28, 1)).save(tmp_path / "best.keras")
  config.eval.num_examples = -1
  config.eval.attacks = {"flow_pgd": {"epsilon": 0.01, "steps": 1}}
  config.eval.flow_pgd_budgets = ()
  results = evaluate.evaluate_workdir(config, str(tmp_path))
  assert results["num_examples"] == 8


def test_augmentation_seeds_are_non_negative_and_varied():
  seeds = np.stack([s.numpy() for s in data.augment_seeds(1).take(500)])
  assert seeds.shape == (500, 2) and seeds.dtype == np.int32
  assert seeds.min() >= 0
  assert len(np.unique(seeds[:, 0])) == 500  # int31 values: no repeats
  # Spread over [0, 2^31), not squeezed into a corner of it.
  assert seeds.min() < 2**31 // 4 and seeds.max() > 3 * (2**31 // 4)
