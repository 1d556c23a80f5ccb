"""The fgr-* command-line tools: help and error reporting."""

import os
import pathlib
import subprocess
import sys

import pytest

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
  theirs in fgr_tf.apps.<name>, not in the launcher."""
  _assert_helpshort_lists([str(BIN / "fgr-train")], APP_FLAGS["train"])
  _assert_helpshort_lists([sys.executable, str(ROOT / "bin" / "train.py")],
                          APP_FLAGS["train"])


@pytest.mark.parametrize("name", sorted(set(APP_FLAGS) - {"train"}))
def test_helpshort_lists_the_flags_of_every_app(name):
  _assert_helpshort_lists([str(BIN / f"fgr-{name}")], APP_FLAGS[name])
