"""Keras callbacks: robustness evaluation during training, atomic checkpoints."""

import json
import math
import os

import keras

from fgr_tf import evaluation


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
      raise ValueError("every_n_epochs must be an int >= 1. Received: "
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
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}.keras")
  try:
    model.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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
    if value is None or math.isnan(value) or value <= self.best:
      return
    self.best = float(value)
    save_atomically(self.model, self.path)
    tmp = self.state_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"best": self.best, "epoch": epoch + 1,
                 "monitor": self.monitor}, f)
    os.replace(tmp, self.state_path)
