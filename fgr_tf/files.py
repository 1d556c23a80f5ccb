"""Atomic file writes: a kill or a full disk never leaves a half-written
file under the final name."""

import json
import os


def replace_atomically(path, write, suffix=""):
  """Calls write(tmp) for a temporary name beside `path`, then renames tmp
  to `path` (atomic on POSIX). On any error, including OSError for a full
  disk, the temporary file is removed and the error propagates; `path`
  keeps its previous content.

  Args:
    path: the final file name.
    write: callable taking the temporary path.
    suffix: ending the temporary name needs (e.g. ".keras", which Keras
      requires of model files).
  """
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}{suffix}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path, text):
  """Writes `text` to `path` atomically."""

  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())

  replace_atomically(path, write)


def write_json(obj, path):
  """Writes `obj` as indented JSON to `path` atomically."""
  write_text(path, json.dumps(obj, indent=2))
