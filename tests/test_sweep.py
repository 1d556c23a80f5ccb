"""fgr_tf.experiment.sweep: overrides, variants, seeds, resumable runs."""

import json
import os

import keras
import pytest

from fgr_tf import files
from fgr_tf import backbones
from fgr_tf.experiment import sweep
from fgr_tf.experiment.configs import smoke
from fgr_tf.experiment.configs import sweep_cifar10
from fgr_tf.experiment.configs import sweep_fashion_mnist
from fgr_tf.experiment.configs import sweep_smoke
from helpers import run_app


def test_overrides_are_parsed_and_typed():
  assert sweep.parse_overrides("fgr.lam=100 adv.attack=flow_pgd "
                               "train.lr_decay_epochs=(1,2)") == [
                                   ("fgr.lam", 100), ("adv.attack", "flow_pgd"),
                                   ("train.lr_decay_epochs", (1, 2))]
  config = sweep.apply_overrides(smoke.get_config(),
                                 "fgr.lam=100 adv.attack=stadv")
  assert config.fgr.lam == 100.0 and isinstance(config.fgr.lam, float)
  assert config.adv.attack == "stadv"
  assert smoke.get_config().fgr.lam == 10.0  # the original is untouched


@pytest.mark.parametrize("text, message", [
    ("fgr.lamb=1", "v: unknown config field 'fgr.lamb'"),
    ("nope.lam=1", "v: unknown config field 'nope.lam'"),
    ("fgr.lam=high", "v: bad value for 'fgr.lam'"),
    ("fgr.lam", "Bad override 'fgr.lam'"),
])
def test_bad_overrides_are_named(text, message):
  with pytest.raises(ValueError, match=message):
    sweep.apply_overrides(smoke.get_config(), text, "v")


def test_variants_follow_the_config_order_and_only():
  config = sweep_fashion_mnist.get_config()
  all_variants = sweep.variants(config)
  assert list(all_variants)[:2] == ["baseline", "igr1000"]
  assert all_variants["fgr100_at"].adv.attack == "flow_pgd"
  assert all_variants["fgr100_at"].fgr.lam == 100.0
  assert all_variants["igr6000"].igr.lam == 6000.0
  config.sweep.only = "fgr300, baseline"
  assert list(sweep.variants(config)) == ["fgr300", "baseline"]
  config.sweep.only = "fgr400"
  with pytest.raises(ValueError, match="Unknown variant 'fgr400'"):
    sweep.variants(config)


def test_sweep_end_to_end_then_resumes_without_retraining(tmp_path,
                                                          monkeypatch):
  config = sweep_smoke.get_config()
  config.sweep.seeds = (0, 1)
  runs = sweep.run_sweep(config, str(tmp_path))
  assert list(runs) == ["baseline", "fgr10", "fgr10_at"]
  for name, seeds in runs.items():
    assert [r["config"]["seed"] for r in seeds] == [0, 1]
    for seed, results in zip((0, 1), seeds):
      assert results["train_seconds"] > 0
      assert (tmp_path / name / f"seed{seed}" / "best.keras").exists()
  assert runs["fgr10_at"][0]["config"]["adv"]["attack"] == "flow_pgd"
  report = (tmp_path / "RESULTS.md").read_text()
  assert "| fgr10_at | 2 | `fgr.lam=10.0 adv.attack=flow_pgd` |" in report
  assert "2 seeds (mean ± standard deviation over seeds)" in report
  assert "flow_pgd@0.05" in report and "adef median T-norm (px)" in report
  assert " ± " in report
  for png in ("budget_curves.png", "deformation_curves.png",
              "deformation_norms.png", "clean_vs_robust.png"):
    assert os.path.getsize(tmp_path / png) > 1000, png
  assert json.loads((tmp_path / "sweep.json").read_text()).keys() == {
      "baseline", "fgr10", "fgr10_at"}

  def no_training(*args):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(sweep.train, "train_and_evaluate", no_training)
  again = sweep.run_sweep(config, str(tmp_path))
  assert again == runs

  # An interrupted sweep: fgr10_at has one seed, reported as such.
  os.remove(tmp_path / "fgr10_at" / "seed1" / "results.json")
  finished = sweep.finished_runs(config, str(tmp_path))
  assert [len(finished[n]) for n in finished] == [2, 2, 1]
  sweep.write_report(config, finished, str(tmp_path))
  report = (tmp_path / "RESULTS.md").read_text()
  assert "3 variants x 1-2 (column `seeds`) seeds" in report
  assert "| fgr10_at | 1 | `fgr.lam=10.0 adv.attack=flow_pgd` |" in report

  # The tool: --report_only trains nothing (seed 0 of each, the config's).
  run_app("sweep", "--config=configs/sweep_smoke.py", f"--workdir={tmp_path}",
          "--report_only")
  assert "3 variants x 1 seeds" in (tmp_path / "RESULTS.md").read_text()


def test_sweep_app_needs_a_sweep_section(tmp_path):
  proc = run_app("sweep", "--config=configs/smoke.py",
                 f"--workdir={tmp_path}", check=False)
  assert proc.returncode != 0
  assert "no `sweep` section" in proc.stdout + proc.stderr


@pytest.mark.parametrize("module", [sweep_fashion_mnist, sweep_smoke,
                                    sweep_cifar10])
def test_every_shipped_sweep_resolves(module):
  config = module.get_config()
  resolved = sweep.variants(config)
  assert len(resolved) == len(config.sweep.variants) >= 3
  assert resolved["baseline"].fgr.lam == 0
  assert any(c.adv.attack for c in resolved.values())


def test_a_variant_writes_its_results_once_with_timings(tmp_path,
                                                        monkeypatch):
  """A kill between two writes left a results.json without timings, which
  counted as done (0.00 train min in the report)."""
  config = smoke.get_config()
  config.eval.attacks = {"flow_pgd": {"epsilon": 0.01, "steps": 1}}
  config.eval.flow_pgd_budgets = ()

  def fake_training(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    keras.utils.set_random_seed(0)
    backbones.build("small_cnn", 10, (28, 28, 1)).save(
        os.path.join(workdir, "best.keras"))

  monkeypatch.setattr(sweep.train, "train_and_evaluate", fake_training)
  written = []
  write_json = files.write_json

  def recording_write_json(obj, path):
    if os.path.basename(path) == "results.json":
      written.append(dict(obj))
    write_json(obj, path)

  monkeypatch.setattr(files, "write_json", recording_write_json)
  workdir = str(tmp_path / "variant")
  results = sweep.run_variant(config, workdir)
  assert len(written) == 1
  assert {"train_seconds", "eval_seconds"} <= set(written[0])
  assert results["eval_seconds"] > 0
  on_disk = json.loads((tmp_path / "variant" / "results.json").read_text())
  assert on_disk["eval_seconds"] == results["eval_seconds"]
  # Done: a second call reads it back, writes nothing.
  assert sweep.run_variant(config, workdir) == results
  assert len(written) == 1
