"""Faults: NaN losses, kills during checkpoint writes, a full disk."""

import errno
import glob
import json
import os
import pathlib
import random
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import fgr_tf
from fgr_tf.experiment import checkpoints
from fgr_tf import files
from fgr_tf.experiment import train
from fgr_tf.experiment.configs import smoke
import save_loop

HERE = pathlib.Path(__file__).parent


def _weights(path):
  return keras.saving.load_model(path).get_weights()


def test_nan_loss_stops_training_and_keeps_the_last_good_state(tmp_path):
  config = smoke.get_config()
  train.train_and_evaluate(config, str(tmp_path))
  good_best = _weights(tmp_path / "best.keras")
  good_final = _weights(tmp_path / "final.keras")

  config.train.epochs = 4
  config.train.learning_rate = 1e30
  keras.backend.clear_session()
  with pytest.raises(train.TrainingDiverged,
                     match="NaN or Inf in epoch 3, batch"):
    train.train_and_evaluate(config, str(tmp_path))
  metadata = json.loads((tmp_path / "backup" /
                         "training_metadata.json").read_text())
  assert metadata["epoch"] == 2  # the diverged epoch was not backed up
  for before, after in ((good_best, _weights(tmp_path / "best.keras")),
                        (good_final, _weights(tmp_path / "final.keras"))):
    for a, b in zip(before, after):
      np.testing.assert_array_equal(a, b)

  config.train.learning_rate = 0.01
  keras.backend.clear_session()
  history = train.train_and_evaluate(config, str(tmp_path))
  assert history.epoch == [2, 3]  # resumed after the last good epoch
  assert all(np.isfinite(history.history["loss"]))


def test_full_disk_is_reported_and_the_old_file_kept(tmp_path, monkeypatch):
  model = fgr_tf.FGRModel(
      fgr_tf.backbones.build("small_cnn", 10, (28, 28, 1)))
  path = tmp_path / "best.keras"
  checkpoints.save_atomically(model, path)
  before = path.read_bytes()

  def full_disk(tmp):
    with open(tmp, "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(model, "save", full_disk)
  with pytest.raises(OSError, match="No space left on device"):
    checkpoints.save_atomically(model, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["best.keras"]  # no temporary left over
  with pytest.raises(OSError, match="No space left"):
    files.replace_atomically(str(tmp_path / "results.json"), full_disk)
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_kills_during_checkpoint_writes_leave_whole_files(tmp_path):
  expected = [save_loop.build(seed).get_weights() for seed in (0, 1)]
  rng = random.Random(0)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  for _ in range(3):
    proc = subprocess.Popen([sys.executable, str(HERE / "save_loop.py"),
                             str(tmp_path)], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
      assert proc.stdout.readline().strip() == "ready"
      time.sleep(rng.uniform(0.05, 1.5))  # somewhere inside a write
    finally:
      proc.kill()
      proc.wait()
    loaded = _weights(tmp_path / "best.keras")
    assert any(all(np.array_equal(a, b) for a, b in zip(loaded, e))
               for e in expected), "best.keras is a mix or corrupt"
    model = save_loop.build(2)
    backup = checkpoints.NaNSafeBackupAndRestore(str(tmp_path / "backup"))
    backup.set_model(model)
    backup.on_train_begin()
    restored = model.get_weights()
    assert any(all(np.array_equal(a, b) for a, b in zip(restored, e))
               for e in expected), "the backup is a mix or corrupt"
  # A kill can leave a temporary file behind, never under a final name.
  leftovers = glob.glob(str(tmp_path / "**" / ".*tmp-*"), recursive=True)
  assert all(".tmp-" in os.path.basename(p) for p in leftovers)
