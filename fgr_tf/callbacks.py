"""Keras callbacks."""

import math

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
