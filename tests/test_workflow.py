"""bin/ apps end to end on the smoke config; kill-and-resume; export."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from ml_collections import config_flags  # noqa: F401  (flag parsing tested)

import fgr_tf
from fgr_tf import export
from fgr_tf import synthetic
from helpers import ROOT
from helpers import assert_close_float32
from helpers import run_app

CONFIGS = sorted((ROOT / "configs").glob("[a-z]*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_load(path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT))
  namespace = {}
  exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102
  config = namespace["get_config"]()
  assert config.data.name in fgr_tf.data.DATASETS
  assert config.model.name in fgr_tf.backbones.NAMES
  assert config.fgr.lam >= 0 and config.train.batch_size > 0


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  run_app("train", "--config=configs/smoke.py", f"--workdir={workdir}",
          "--config.fgr.lam=3")
  return workdir


def test_train_writes_config_checkpoints_and_history(smoke_workdir):
  config = json.loads((smoke_workdir / "config.json").read_text())
  assert config["fgr"]["lam"] == 3  # the command-line override
  for name in ("best.keras", "final.keras", "history.csv", "tensorboard",
               "backup"):
    assert (smoke_workdir / name).exists(), name
  rows = list(csv.DictReader(open(smoke_workdir / "history.csv")))
  assert [r["epoch"] for r in rows] == ["0", "1"]
  assert {"loss", "ce", "fgr_penalty", "val_accuracy"} <= set(rows[0])
  model = keras.saving.load_model(smoke_workdir / "final.keras")
  assert isinstance(model, fgr_tf.FGRModel) and model.fgr_lambda == 3.0


def test_rerunning_a_finished_workdir_trains_no_more(smoke_workdir):
  run_app("train", "--config=configs/smoke.py",
          f"--workdir={smoke_workdir}", "--config.fgr.lam=3")
  summary = json.loads((smoke_workdir / "train_summary.json").read_text())
  assert summary["epochs_this_run"] == 0
  rows = list(csv.DictReader(open(smoke_workdir / "history.csv")))
  assert len(rows) == 2


def test_config_typos_are_rejected(tmp_path):
  proc = run_app("train", "--config=configs/smoke.py",
                 f"--workdir={tmp_path}", "--config.fgr.lamb=3", check=False)
  assert proc.returncode != 0
  assert "lamb" in proc.stderr


def test_evaluate_writes_results_and_prints_a_table(smoke_workdir):
  proc = run_app("evaluate", "--config=configs/smoke.py",
                 f"--workdir={smoke_workdir}")
  results = json.loads((smoke_workdir / "results.json").read_text())
  assert results["num_examples"] == 32
  assert set(results["attacks"]) == {"flow_pgd", "stadv", "adef",
                                     "worst_of_k", "flow_pgd@0.05"}
  assert "| flow_pgd |" in proc.stdout
  out = smoke_workdir / "plots"
  run_app("plot", f"--results={smoke_workdir / 'results.json'}",
          f"--output_dir={out}")
  for name in ("lambda_tradeoff.png", "budget_curves.png",
               "deformation_curves.png", "deformation_norms.png",
               "gallery.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_export_round_trip(smoke_workdir, tmp_path):
  export_dir = tmp_path / "served"
  run_app("export", f"--workdir={smoke_workdir}",
          f"--export_dir={export_dir}")
  model = keras.saving.load_model(smoke_workdir / "best.keras")
  images, _ = synthetic.shapes(5, seed=3)
  expected = tf.nn.softmax(model(images, training=False)).numpy()
  loaded = tf.saved_model.load(str(export_dir))
  out = loaded.signatures["serving_default"](images=tf.constant(images))
  # float32 round-off of small_cnn's forward pass: conv0, conv1, fc (the
  # longest sum: 7 * 7 * 64 = 3136 inputs), dense, softmax.
  reduction, depth = 7 * 7 * 64, 5
  assert_close_float32(out["probabilities"], expected, reduction, depth)
  np.testing.assert_array_equal(out["classes"], expected.argmax(-1))
  as_uint8 = np.round(images * 255).astype(np.uint8)
  out8 = loaded.signatures["serving_uint8"](images=tf.constant(as_uint8))
  assert_close_float32(  # the signature divides by 255 in float32: +1
      out8["probabilities"],
      tf.nn.softmax(model(as_uint8 / 255.0, training=False)), reduction,
      depth + 1)
  # Bad input is rejected by the signature.
  rejected = (TypeError, ValueError, tf.errors.InvalidArgumentError)
  with pytest.raises(rejected, match="float"):
    loaded.signatures["serving_default"](images=tf.constant(as_uint8))
  for bad_shape in ([1, 32, 32, 1], [1, 28, 28, 2], [28, 28, 1]):
    with pytest.raises(rejected, match="[Ss]hape"):
      loaded.signatures["serving_default"](images=tf.zeros(bad_shape))
  with pytest.raises(tf.errors.InvalidArgumentError, match="in \\[0, 1\\]"):
    loaded.signatures["serving_default"](images=tf.constant(images * 255))
  # saved_model_cli, as a serving engineer would check it.
  cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
  np.save(tmp_path / "batch.npy", images[:2])
  proc = subprocess.run(
      [str(cli), "run", "--dir", str(export_dir), "--tag_set", "serve",
       "--signature_def", "serving_default", "--inputs",
       f"images={tmp_path / 'batch.npy'}", "--outdir", str(tmp_path / "cli"),
       "--overwrite"],
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, proc.stderr
  assert_close_float32(np.load(tmp_path / "cli" / "probabilities.npy"),
                       expected[:2], reduction, depth)
  np.testing.assert_array_equal(np.load(tmp_path / "cli" / "classes.npy"),
                                expected[:2].argmax(-1))


def test_export_rejects_unknown_input_shape():
  inputs = keras.Input((None, None, 1))
  model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
  with pytest.raises(ValueError, match="fully known"):
    export.export_saved_model(model, "/tmp/never_written")


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_epoch(tmp_path):
  epochs = 4  # killed after 2 (an epoch is 48 steps: seconds)
  args = [sys.executable, str(ROOT / "bin" / "train.py"),
          "--config=configs/smoke.py", f"--workdir={tmp_path}",
          f"--config.train.epochs={epochs}",
          "--config.data.num_train_examples=3072",
          "--config.eval.callback.every_n_epochs=0"]  # resuming only
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  history = tmp_path / "history.csv"
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      if history.exists() and len(history.read_text().splitlines()) >= 3:
        break
      assert proc.poll() is None, "training ended before it could be killed"
      time.sleep(0.2)
    else:
      pytest.fail("no epoch finished in time")
    os.killpg(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  done_before = len(history.read_text().splitlines()) - 1
  assert done_before < epochs
  run_app("train", *args[2:])
  summary = json.loads((tmp_path / "train_summary.json").read_text())
  assert summary["last_epoch"] == epochs
  # It resumed: fewer epochs than a restart would run.
  assert summary["epochs_this_run"] <= epochs - done_before
  epochs_logged = [int(r["epoch"]) for r in
                   csv.DictReader(open(history))]
  assert epochs_logged[-1] == epochs - 1
  assert len(epochs_logged) == len(set(epochs_logged))
