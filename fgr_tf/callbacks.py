"""Keras callback: robustness evaluation during training."""

import math

import keras

from fgr_tf import attacks as attacks_lib
from fgr_tf import errors
from fgr_tf import evaluation


class RobustnessEvaluation(keras.callbacks.Callback):
  """Runs attacks on a fixed validation subset every N epochs.

  Writes into the epoch logs, so History, CSVLogger and TensorBoard record
  them (list this callback BEFORE CSVLogger / TensorBoard in
  `callbacks=[...]`), for each attack (by its label):
    val_<label>_acc      adversarial (robust) accuracy;
    val_<label>_success  success rate on correctly classified inputs;
  and for minimal attacks (stAdv, ADef: they fool ~every model, so the
  size of the deformation they need is what measures robustness):
    val_<label>_median_t_norm, val_<label>_mean_t_norm  (pixels, over the
      successful attacks on correctly classified inputs);
    val_<label>_acc@<b>px  robust accuracy at a deformation budget of b
      pixels (correct, and the attack failed or needed a T-norm > b).
  On epochs it skips it writes NaN, so every epoch has the same columns.

  Args:
    images: [N, H, W, C] floats in [0, 1], the fixed validation subset.
    labels: [N] ints.
    attacks: `Attack`s, or what `fgr_tf.attacks.resolve` takes (names, or
      label -> settings); keep them cheap, this runs during training.
    every_n_epochs: evaluate after epochs N, 2N, ... (1-based).
    batch_size: attack batch size.
    budgets_px: deformation budgets (pixels) for the minimal attacks.

  Example:
    ```python
    callback = fgr_tf.callbacks.RobustnessEvaluation(
        x_val[:200], y_val[:200], {"adef": {"max_iter": 50}},
        every_n_epochs=5)
    model.fit(x, y, epochs=80, callbacks=[callback, keras.callbacks.CSVLogger(
        "history.csv")])
    ```
  """

  def __init__(self, images, labels, attacks, every_n_epochs=1,
               batch_size=256, budgets_px=evaluation.BUDGETS_PX):
    super().__init__()
    if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
      raise errors.UserError("every_n_epochs must be an int >= 1. Received: "
                             f"every_n_epochs={every_n_epochs}")
    self.images = images
    self.labels = labels
    self.attacks = attacks_lib.resolve(attacks)
    self.every_n_epochs = int(every_n_epochs)
    self.batch_size = batch_size
    self.budgets_px = tuple(budgets_px)
    self.last_results = None

  def log_names(self):
    """The log keys this callback writes, in order."""
    names = []
    for attack in self.attacks:
      prefix = f"val_{attack.label}"
      names += [f"{prefix}_acc", f"{prefix}_success"]
      if attack.kind == "minimal":
        names += [f"{prefix}_median_t_norm", f"{prefix}_mean_t_norm"]
        names += [f"{prefix}_acc@{b:g}px" for b in self.budgets_px]
    return names

  def on_epoch_end(self, epoch, logs=None):
    if logs is None:
      return
    if (epoch + 1) % self.every_n_epochs:
      logs.update({name: math.nan for name in self.log_names()})
      return
    results = evaluation.evaluate(self.model, (self.images, self.labels),
                                  self.attacks, batch_size=self.batch_size,
                                  budgets_px=self.budgets_px)
    self.last_results = results
    nan = lambda v: math.nan if v is None else v
    for label, r in results["attacks"].items():
      prefix = f"val_{label}"
      logs[f"{prefix}_acc"] = r["adversarial_accuracy"]
      logs[f"{prefix}_success"] = nan(r["success_rate"])
      if r["kind"] == "minimal":
        logs[f"{prefix}_median_t_norm"] = nan(r["median_t_norm"])
        logs[f"{prefix}_mean_t_norm"] = nan(r["mean_t_norm"])
        for budget, accuracy in r["robust_accuracy_at_px"].items():
          logs[f"{prefix}_acc@{budget}px"] = accuracy
