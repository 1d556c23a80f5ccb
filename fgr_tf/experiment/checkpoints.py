"""Checkpoint callbacks of a training workdir: atomic, NaN-safe, resumable.

`save_atomically`, `StopOnNaN`, `NaNSafeBackupAndRestore` and
`AtomicBestCheckpoint` keep a workdir whole through kills, full disks and a
diverging loss (README, Reliability).
"""

import json
import math
import os
import shutil

import keras

from fgr_tf import files


def save_atomically(model, path):
  """model.save to a temporary name in the same directory, then rename.

  A crash or kill during the write leaves the previous file intact.
  """
  files.replace_atomically(path, model.save, suffix=".keras")


def _finite_loss(logs):
  loss = (logs or {}).get("loss")
  return loss is None or math.isfinite(float(loss))


class StopOnNaN(keras.callbacks.Callback):
  """Stops training at the first batch whose loss is NaN or Inf.

  Like keras.callbacks.TerminateOnNaN, and records where: `nan_epoch`
  (0-based) and `nan_batch`, None while the loss is finite. The checkpoint
  callbacks here skip epochs whose loss is not finite, so the last good
  state survives.
  """

  def __init__(self):
    super().__init__()
    self.nan_epoch = self.nan_batch = None
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if not _finite_loss(logs) and self.nan_epoch is None:
      self.nan_epoch, self.nan_batch = self._epoch, batch
      self.model.stop_training = True


class NaNSafeBackupAndRestore(keras.callbacks.BackupAndRestore):
  """keras.callbacks.BackupAndRestore, NaN-safe and atomic.

  Never backs up an epoch whose loss is NaN or Inf (a resumed run restarts
  from the last good epoch), and writes every file to a temporary name
  first, then renames it, so a kill during the write leaves the previous
  backup whole (Keras writes in place and relies on the double checkpoint).
  """

  def on_epoch_end(self, epoch, logs=None):
    if _finite_loss(logs):
      super().on_epoch_end(epoch, logs)

  def _save_model(self):
    # Replaces keras' BackupAndRestore._save_model (same files and format).
    os.makedirs(self.backup_dir, exist_ok=True)
    if self.double_checkpoint:
      for src, dst in ((self._weights_path, self._prev_weights_path),
                       (self._training_metadata_path,
                        self._prev_training_metadata_path)):
        if os.path.exists(src):
          files.replace_atomically(
              dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
    files.replace_atomically(
        self._weights_path,
        lambda tmp: self.model.save_weights(tmp, overwrite=True),
        suffix=".weights.h5")
    files.write_text(self._training_metadata_path, json.dumps(
        {"epoch": self._current_epoch, "batch": self._last_batch_seen}))


class AtomicBestCheckpoint(keras.callbacks.Callback):
  """Saves the model with the best `monitor` value, atomically.

  The best value is kept in `<path>.json` beside the model, so a resumed
  run does not overwrite a better model from before the interruption.

  Args:
    path: the `.keras` file to write.
    monitor: the log key to maximize (e.g. "val_accuracy").
  """

  def __init__(self, path, monitor="val_accuracy"):
    super().__init__()
    self.path = path
    self.monitor = monitor
    self.state_path = path + ".json"
    self.best = -math.inf

  def on_train_begin(self, logs=None):
    if os.path.exists(self.state_path) and os.path.exists(self.path):
      with open(self.state_path) as f:
        self.best = json.load(f)["best"]

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    if (value is None or math.isnan(value) or value <= self.best or
        not _finite_loss(logs)):
      return
    self.best = float(value)
    save_atomically(self.model, self.path)
    files.write_text(self.state_path, json.dumps(
        {"best": self.best, "epoch": epoch + 1, "monitor": self.monitor}))
