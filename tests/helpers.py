"""Tiny models and data for fast tests; running the bin/ apps."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np

import fgr_tf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_app(name, *args, check=True, timeout=300):
  """Runs `python bin/<name>.py *args` from the repository root; returns the
  CompletedProcess (text stdout/stderr). check: raise unless exit code 0."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, str(ROOT / "bin" / f"{name}.py"),
                         *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
  return proc


def tiny_data(n=8, size=8, channels=2, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n, size, size, channels)).astype(np.float32)
  labels = rng.integers(0, classes, size=n).astype(np.int32)
  return images, labels


def tiny_backbone(size=8, channels=2, classes=3, batch_norm=True,
                  sync_batchnorm=False, seed=0, dtype=None):
  """conv-(BN)-relu-pool-dense; small enough for per-test compilation."""
  keras.utils.set_random_seed(seed)
  factory = fgr_tf.models.layers.LayerFactory(dtype,
                                              sync_batchnorm=sync_batchnorm)
  inputs = keras.Input((size, size, channels))
  x = factory.conv(4, "conv0")(inputs)
  if batch_norm:
    x = factory.batch_norm("bn0")(x)
  x = factory.relu()(x)
  x = factory.max_pool()(x)
  x = keras.layers.Flatten(dtype=dtype)(x)
  return keras.Model(inputs, factory.dense(classes, "dense")(x))


def no_bn_model(dtype="float64"):
  """A float64 classifier of 8x8x2 images into 3 classes WITHOUT BatchNorm
  (conv-relu-pool-dense): its samples are independent in any mode."""
  return tiny_backbone(batch_norm=False, dtype=dtype)


def copy_of(model):
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  return clone


def fit_fgr_on_one_batch(strategy, batch_norm, sync_batchnorm, images,
                         labels, initial_weights, epochs=2):
  """The tiny FGR + IGR model (no random start) built in `strategy`'s scope,
  fit for `epochs` steps on one global batch; (backbone weights, logs)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    backbone = tiny_backbone(batch_norm=batch_norm,
                             sync_batchnorm=sync_batchnorm)
    backbone.set_weights(initial_weights)
    model = fgr_tf.FGRModel(backbone, fgr_lambda=300.0, rs_sigma=0.0,
                            igr_lambda=5.0)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  metrics=["accuracy"])
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
      len(images))
  logs = model.fit(dataset, epochs=epochs, shuffle=False, verbose=0).history
  return model.backbone.get_weights(), logs
