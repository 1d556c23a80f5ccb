"""The fgr-* command-line tools: help and error reporting."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fgr_tf import attacks
from fgr_tf import data
from fgr_tf import distribute
from fgr_tf import errors
from fgr_tf.experiment import sweep
from fgr_tf.experiment import train
from fgr_tf import validation
from fgr_tf.experiment.configs import smoke
from helpers import ROOT

BIN = pathlib.Path(sys.executable).parent
# The flags each app defines (its own, not absl's or TensorFlow's).
APP_FLAGS = {
    "train": ("--config", "--workdir"),
    "evaluate": ("--config", "--workdir", "--checkpoint"),
    "export": ("--workdir", "--checkpoint", "--export_dir"),
    "plot": ("--results", "--labels", "--output_dir", "--attack"),
    "sweep": ("--config", "--workdir"),
}


def _run(args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("FGR_TF_TRACEBACK", None)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, **kwargs)


def _assert_helpshort_lists(command, flags):
  proc = _run(command + ["--helpshort"])
  for flag in flags:
    assert flag in proc.stdout, (command, proc.stdout, proc.stderr)


def test_helpshort_lists_the_flags_of_fgr_train_and_bin_train():
  """absl's --helpshort shows the main module's flags; the apps define
  theirs in fgr_tf.experiment.apps.<name>, not in the launcher."""
  _assert_helpshort_lists([str(BIN / "fgr-train")], APP_FLAGS["train"])
  _assert_helpshort_lists([sys.executable, str(ROOT / "bin" / "train.py")],
                          APP_FLAGS["train"])


@pytest.mark.parametrize("name", sorted(set(APP_FLAGS) - {"train"}))
def test_helpshort_lists_the_flags_of_every_app(name):
  _assert_helpshort_lists([str(BIN / f"fgr-{name}")], APP_FLAGS[name])


def _run_main_raising(error):
  code = ("from fgr_tf.experiment import apps\n"
          + ("from fgr_tf import errors\n" if "errors." in error else "") +
          "def main(argv):\n"
          f"  raise {error}\n"
          "apps.run(main)\n")
  return _run([sys.executable, "-c", code])


def test_a_user_error_is_one_line_and_exit_1():
  proc = _run_main_raising("errors.UserError('bad value: lam=-1')")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "-c: error: UserError: bad value: lam=-1")


def test_a_bug_keeps_its_traceback():
  """A plain ValueError (or any other error we did not raise on purpose)
  is a bug: it must not look like a user's mistake. OSError and
  RuntimeError are the parents of DataNotFoundError and TrainingDiverged
  (user errors), themselves bugs (RuntimeError checked without a process:
  its path through `apps.run` is ValueError's)."""
  assert not any(issubclass(error, errors.ONE_LINE_ERRORS)
                 for error in (ValueError, RuntimeError, OSError))
  for error in ("ValueError('a bug')", "OSError('a bug')"):
    proc = _run_main_raising(error)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr, error
    assert proc.stderr.strip().splitlines()[-1].endswith(error.replace(
        "('", ": ").replace("')", "")), proc.stderr


def test_fgr_train_prints_a_library_user_error_on_one_line(tmp_path):
  """A typo in the data set name, found deep in the library."""
  proc = _run([str(BIN / "fgr-train"), "--config=configs/smoke.py",
               f"--workdir={tmp_path}", "--config.data.name=imagenet"])
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "fgr-train: error: UserError: Unknown dataset 'imagenet'")


def test_the_errors_we_raise_on_purpose_are_user_errors(tmp_path):
  config = smoke.get_config()
  config.adv.attack = "fgsm"
  for call in (lambda: data.load("imagenet", "train"),
               lambda: data.load("synthetic", "test", num_examples=0),
               lambda: attacks.make("fgsm"),
               lambda: distribute.get_strategy("gpu9"),
               lambda: validation.check_images(np.zeros((2, 4, 4, 1)) + 9,
                                               "test"),
               lambda: sweep.parse_overrides("fgr.lam"),
               lambda: train.make_adversary(config)):
    with pytest.raises(errors.UserError):
      call()
  with pytest.raises(errors.DataNotFoundError) as missing:
    data.load("fashion_mnist", "train", data_dir=str(tmp_path))
  assert isinstance(missing.value, FileNotFoundError)
  assert issubclass(train.TrainingDiverged, errors.ONE_LINE_ERRORS)
