"""Keras callbacks: robustness evaluation during training, atomic and
NaN-safe checkpoints."""

import json
import math
import os
import shutil

import keras

from fgr_tf import errors
from fgr_tf import evaluation
from fgr_tf import files


class RobustnessEvaluation(keras.callbacks.Callback):
  """Runs attacks on a fixed validation subset every N epochs.

  Writes `val_<attack>_acc` (adversarial accuracy) and
  `val_<attack>_success` (success rate on correctly classified inputs) into
  the epoch logs, so History, CSVLogger and TensorBoard record them: list
  this callback BEFORE CSVLogger / TensorBoard in `callbacks=[...]`. On
  epochs it skips it writes NaN, so every epoch has the same columns.

  Args:
    images: [N, H, W, C] floats in [0, 1], the fixed validation subset.
    labels: [N] ints.
    attacks: as `fgr_tf.evaluation.resolve_attacks` (names, or name ->
      settings); keep budgets small, this runs during training.
    every_n_epochs: evaluate after epochs N, 2N, ... (1-based).
    batch_size: attack batch size.

  Example:
    ```python
    callback = fgr_tf.callbacks.RobustnessEvaluation(
        x_val[:500], y_val[:500], {"flow_pgd": {"epsilon": 0.01, "steps": 20}},
        every_n_epochs=5)
    model.fit(x, y, epochs=80, callbacks=[callback, keras.callbacks.CSVLogger(
        "history.csv")])
    ```
  """

  def __init__(self, images, labels, attacks, every_n_epochs=1,
               batch_size=256):
    super().__init__()
    if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
      raise errors.UserError("every_n_epochs must be an int >= 1. Received: "
                             f"every_n_epochs={every_n_epochs}")
    self.images = images
    self.labels = labels
    self.attacks = evaluation.resolve_attacks(attacks)
    self.every_n_epochs = int(every_n_epochs)
    self.batch_size = batch_size
    self.last_results = None

  def on_epoch_end(self, epoch, logs=None):
    if logs is None:
      return
    if (epoch + 1) % self.every_n_epochs:
      for name in self.attacks:
        logs[f"val_{name}_acc"] = math.nan
        logs[f"val_{name}_success"] = math.nan
      return
    results = evaluation.evaluate(self.model, (self.images, self.labels),
                                  self.attacks, batch_size=self.batch_size)
    self.last_results = results
    for name, r in results["attacks"].items():
      logs[f"val_{name}_acc"] = r["adversarial_accuracy"]
      logs[f"val_{name}_success"] = (math.nan if r["success_rate"] is None
                                     else r["success_rate"])


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
