"""fgr_tf.export replaces an export safely: never a missing or mixed one."""

import errno
import os

import numpy as np
import pytest
import tensorflow as tf

from fgr_tf import export
from helpers import assert_close_float32, tiny_backbone

# keras.export.ExportArchive() makes an instance of a backend subclass.
ARCHIVE = type(export.keras.export.ExportArchive())
IMAGES = np.random.default_rng(0).uniform(size=(3, 8, 8, 2)).astype(
    np.float32)


class Killed(BaseException):
  """Stands for SIGKILL: no `except Exception` handler runs."""


def _model(seed):
  return tiny_backbone(batch_norm=False, seed=seed)


def _served(export_dir):
  return _probabilities(tf.saved_model.load(str(export_dir)))


def _probabilities(loaded):
  return loaded.signatures["serving_default"](
      images=tf.constant(IMAGES))["probabilities"].numpy()


def _expected(model):
  return tf.nn.softmax(model(IMAGES, training=False)).numpy()


def _assert_serves(export_dir, model, loaded=None):
  """The export (or its `loaded` SavedModel) serves `model`'s
  probabilities, up to float32 round-off: conv (18 terms), dense (its 64
  inputs), softmax; the two models' seeds make theirs differ by far more."""
  served = _probabilities(loaded) if loaded else _served(export_dir)
  assert_close_float32(served, _expected(model), reduction=64, depth=3)


def _siblings(export_dir):
  """Everything beside the export (temporary or old directories)."""
  return sorted(n for n in os.listdir(os.path.dirname(export_dir))
                if n != os.path.basename(export_dir))


@pytest.fixture
def models():
  return _model(0), _model(1)


def test_exports_in_sequence_replace_and_leave_no_temporaries(tmp_path,
                                                              models):
  target = str(tmp_path / "served")
  for model in models + models[:1]:
    assert export.export_saved_model(model, target) == target
    _assert_serves(target, model)
    assert _siblings(target) == []


def test_an_export_started_during_another_does_not_break_it(
    tmp_path, models, monkeypatch):
  """Two exports to one directory at once (the second runs entirely while
  the first writes): each has its own temporary directory, both succeed,
  and the one that finishes last is served."""
  target = str(tmp_path / "served")
  export.export_saved_model(models[1], target)
  write_out = ARCHIVE.write_out
  nested = []

  def write_out_then_let_another_export_run(self, path, **kwargs):
    write_out(self, path, **kwargs)
    if not nested:
      nested.append(path)
      export.export_saved_model(models[1], target)

  monkeypatch.setattr(ARCHIVE, "write_out",
                      write_out_then_let_another_export_run)
  export.export_saved_model(models[0], target)
  assert nested
  _assert_serves(target, models[0])
  assert _siblings(target) == []


def _kill_when_moving_into(target, monkeypatch):
  """os.rename / os.replace onto `target` raise Killed (other calls run)."""
  for name in ("rename", "replace"):
    original = getattr(os, name)

    def guarded(src, dst, *args, original=original, **kwargs):
      if os.path.abspath(dst) == target:
        raise Killed()
      return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, name, guarded)


def test_killed_between_moving_the_old_export_aside_and_the_new_in(
    tmp_path, models, monkeypatch):
  """Without an atomic swap (not Linux, or a file system without
  RENAME_EXCHANGE) the old export is renamed aside first; a kill right
  after leaves it there, and the loader or the next export restores it."""
  target = str(tmp_path / "served")
  export.export_saved_model(models[0], target)

  def no_exchange(a, b):
    raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported")

  monkeypatch.setattr(export, "_exchange", no_exchange, raising=False)
  with monkeypatch.context() as patch:
    _kill_when_moving_into(target, patch)
    with pytest.raises(Killed):
      export.export_saved_model(models[1], target)
  loaded = export.load_saved_model(target)  # recovers the old export
  _assert_serves(target, models[0], loaded)
  _assert_serves(target, models[0])
  assert all(".tmp-" in n for n in _siblings(target))  # the unfinished new
  export.export_saved_model(models[1], target)  # cleans up
  _assert_serves(target, models[1])
  assert _siblings(target) == []


def test_killed_before_or_after_the_atomic_swap(tmp_path, models,
                                                monkeypatch):
  target = str(tmp_path / "served")
  export.export_saved_model(models[0], target)
  exchange = export._exchange  # pylint: disable=protected-access

  def killed(a, b):
    raise Killed()

  monkeypatch.setattr(export, "_exchange", killed)
  with pytest.raises(Killed):
    export.export_saved_model(models[1], target)
  _assert_serves(target, models[0])  # untouched, loads as is

  def swap_then_killed(a, b):
    exchange(a, b)
    raise Killed()

  monkeypatch.setattr(export, "_exchange", swap_then_killed)
  with pytest.raises(Killed):
    export.export_saved_model(models[1], target)
  _assert_serves(target, models[1])  # the new one, whole
  monkeypatch.setattr(export, "_exchange", exchange)
  export.export_saved_model(models[0], target)
  assert _siblings(target) == []


def test_a_failed_write_keeps_the_old_export(tmp_path, models, monkeypatch):
  target = str(tmp_path / "served")
  export.export_saved_model(models[0], target)

  def full_disk(self, path, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ARCHIVE, "write_out",
                      full_disk)
  with pytest.raises(OSError, match="No space left"):
    export.export_saved_model(models[1], target)
  _assert_serves(target, models[0])
  assert _siblings(target) == []


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="Linux only")
def test_the_swap_is_atomic_on_linux(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  (a / "which").write_text("a")
  (b / "which").write_text("b")
  export._exchange(str(a), str(b))  # pylint: disable=protected-access
  assert (a / "which").read_text() == "b"
  assert (b / "which").read_text() == "a"
