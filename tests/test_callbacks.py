"""RobustnessEvaluation: what minimal attacks measure, logged per epoch."""

import csv
import math

import keras
import numpy as np

import fgr_tf
from fgr_tf import synthetic


def test_minimal_attack_logs_t_norms_and_budget_accuracies(tmp_path):
  images, labels = synthetic.shapes(48, size=12, seed=3)
  keras.utils.set_random_seed(0)
  model = fgr_tf.FGRModel(fgr_tf.backbones.build("small_cnn", 10,
                                                 (12, 12, 1)), fgr_lambda=1.0)
  model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
  subset = (images[:16], labels[:16])
  callback = fgr_tf.callbacks.RobustnessEvaluation(
      *subset, {"adef": {"max_iter": 5}}, every_n_epochs=2,
      budgets_px=(0.1, 0.5))
  csv_path = tmp_path / "history.csv"
  history = model.fit(images, labels, batch_size=16, epochs=2, verbose=0,
                      callbacks=[callback,
                                 keras.callbacks.CSVLogger(str(csv_path))])
  logs = {k: v[-1] for k, v in history.history.items()}
  # By hand, from the same (deterministic) attack on the trained model:
  result = fgr_tf.attacks.adef(model, *subset, max_iter=5)
  correct = np.argmax(model(subset[0]), -1) == subset[1]
  success = result.success.numpy() & correct
  t = result.t_norm.numpy()
  assert success.any(), "the test needs some successful attacks"
  np.testing.assert_allclose(logs["val_adef_median_t_norm"],
                             np.median(t[success]), rtol=1e-6)
  np.testing.assert_allclose(logs["val_adef_mean_t_norm"],
                             np.mean(t[success]), rtol=1e-6)
  for budget in (0.1, 0.5):
    robust = np.mean(correct & (~success | (t > budget)))
    assert logs[f"val_adef_acc@{budget:g}px"] == robust
  assert logs["val_adef_acc"] == np.mean(
      correct & (np.argmax(result.adv_logits, -1) == subset[1]))
  assert logs["val_adef_success"] == success.sum() / correct.sum()
  # Epoch 1 was skipped: NaN in every column, so the CSV stays rectangular.
  first = {k: v[0] for k, v in history.history.items()}
  assert all(math.isnan(first[k]) for k in callback.log_names())
  with open(csv_path) as f:
    header = next(csv.reader(f))
  assert set(callback.log_names()) <= set(header)
  assert "val_adef_acc@0.5px" in header
