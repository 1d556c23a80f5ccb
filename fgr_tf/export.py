"""SavedModel export for serving.

Signatures (images NHWC, the training image size):
  serving_default(images: float32 in [0, 1]) -> {probabilities, classes}
  serving_uint8(images: uint8 in [0, 255])   -> {probabilities, classes}
Wrong dtypes are rejected by the signature itself, wrong shapes (rank,
size, channels) and float values outside [0, 1] (e.g. 0-255 floats) or NaN
with an InvalidArgumentError that says so.

Replacing an export never leaves the directory missing or mixed: the new
one is written to a unique temporary directory beside it, then swapped in
atomically (Linux: renameat2 with RENAME_EXCHANGE). Where that is not
available, the old one is renamed aside, the new one renamed in, the old
one deleted; a kill between those two renames leaves the old one aside,
and `load_saved_model` or the next export puts it back (`recover`).
"""

import ctypes
import errno
import os
import shutil
import threading
import time
import uuid

import keras
import tensorflow as tf

from fgr_tf import errors
from fgr_tf import validation
from fgr_tf.backbones import folding


def _predict(backbone, images):
  logits = tf.cast(folding.inference_function(backbone)(images),
                   tf.float32)
  return {"probabilities": tf.nn.softmax(logits),
          "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}


def _check_shape(images, shape):
  # A loaded signature does not check shapes itself, and a convolution
  # silently accepts a multiple of its channels (grouped convolution).
  return tf.ensure_shape(images, shape, name="check_image_shape")


def _serve_float(backbone, images, shape):
  images = _check_shape(images, shape)
  checks = validation.image_assertions(
      images, "serving_default",
      hint=" (or use the serving_uint8 signature for 0-255 uint8)")
  with tf.control_dependencies(checks):
    return _predict(backbone, tf.identity(images))


def _serve_uint8(backbone, images, shape):
  images = _check_shape(images, shape)
  return _predict(backbone, tf.cast(images, tf.float32) / 255.0)


def export_saved_model(model, export_dir, input_shape=None):
  """Writes a SavedModel with float32 and uint8 signatures, atomically.

  Built with `keras.export.ExportArchive`, so TF Serving and
  `saved_model_cli run` (TF1-style loading) both work. Written to a unique
  temporary directory beside `export_dir`, then swapped in (see the module
  docstring): concurrent exports to one directory do not collide, the one
  that finishes last is kept.

  Args:
    model: a Keras classifier returning logits (FGRModel or backbone).
    export_dir: output directory (replaced if it exists).
    input_shape: (H, W, C); default the model's input shape.

  Returns:
    export_dir, made absolute.
  """
  backbone = getattr(model, "backbone", model)
  if input_shape is None:
    input_shape = tuple(backbone.input_shape[1:])
  if len(input_shape) != 3 or None in input_shape:
    raise errors.UserError("input_shape must be a fully known (height, width, "
                           f"channels). Received: input_shape={input_shape}")
  shape = [None, *input_shape]
  archive = keras.export.ExportArchive()
  archive.track(backbone)
  archive.add_endpoint(
      "serving_default", lambda images: _serve_float(backbone, images, shape),
      input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
  archive.add_endpoint(
      "serving_uint8", lambda images: _serve_uint8(backbone, images, shape),
      input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")])
  export_dir = os.path.abspath(export_dir)
  recover(export_dir)
  tmp = _new_temporary(export_dir, "tmp")
  try:
    archive.write_out(tmp, verbose=False)
    _replace_directory(tmp, export_dir)
  except Exception:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    _release(tmp)
  return export_dir


def load_saved_model(export_dir):
  """`tf.saved_model.load(export_dir)`, after `recover(export_dir)`."""
  recover(export_dir)
  return tf.saved_model.load(export_dir)


# Temporary (".<name>.tmp-<pid>-<id>") and old (".<name>.old-<pid>-<id>")
# directories beside an export. Those of a live process are in use, except
# this process's own that `_in_use` does not list (an export that failed).
_in_use = set()
_in_use_lock = threading.Lock()
# An old export left aside by a process that looks alive (its pid may have
# been reused) is restored after this long: the rename that should follow
# takes microseconds.
_ASIDE_TIMEOUT_SECONDS = 600


def _new_temporary(export_dir, kind, create=True):
  parent, name = os.path.split(export_dir)
  path = os.path.join(parent,
                      f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
  with _in_use_lock:
    _in_use.add(path)
  if create:
    os.makedirs(path)
  return path


def _release(path):
  with _in_use_lock:
    _in_use.discard(path)


def _process_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(export_dir, kind):
  """Paths of `kind` ("tmp" or "old") beside export_dir no live export
  uses, oldest first."""
  parent, name = os.path.split(export_dir)
  prefix = f".{name}.{kind}-"
  found = []
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return []
  for entry in entries:
    if not entry.startswith(prefix):
      continue
    path = os.path.join(parent, entry)
    try:
      pid = int(entry[len(prefix):].split("-")[0])
      changed = os.lstat(path).st_ctime
    except (ValueError, OSError):
      continue
    with _in_use_lock:
      in_use = path in _in_use
    if pid == os.getpid():
      if in_use:
        continue
    elif _process_alive(pid) and not (
        kind == "old" and time.time() - changed > _ASIDE_TIMEOUT_SECONDS):
      continue
    found.append((changed, path))
  return [path for _, path in sorted(found)]


def recover(export_dir):
  """Repairs what a killed export left beside `export_dir`.

  If `export_dir` is missing and an old export was left aside (a kill
  between the two renames of the fallback replacement), the newest such is
  renamed back; unused temporary and old directories are deleted. Safe to
  call while other processes export to the same directory.
  """
  export_dir = os.path.abspath(export_dir)
  for old in reversed(_leftovers(export_dir, "old")):
    if not os.path.lexists(export_dir):
      try:
        _rename(old, export_dir)
        continue
      except OSError as e:  # another export got there first
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
          raise
    shutil.rmtree(old, ignore_errors=True)
  for tmp in _leftovers(export_dir, "tmp"):
    shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a, b):
  """Atomically swaps the paths `a` and `b` (Linux renameat2 with
  RENAME_EXCHANGE); OSError (ENOSYS, EINVAL, ...) where unsupported."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError) as e:
    raise OSError(errno.ENOSYS, f"renameat2 is not available: {e}") from e
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
               _RENAME_EXCHANGE) != 0:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), a, None, b)


def _rename(src, dst):
  os.rename(src, dst)


# renameat2 errors meaning "no atomic swap here": use the fallback.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                errno.EPERM}


def _replace_directory(new, target):
  """Puts directory `new` at `target`, replacing what is there, so that
  `target` is never missing (atomic swap) or, without RENAME_EXCHANGE,
  missing only between two renames (see `recover`). The export that
  finishes last wins."""
  for _ in range(100):
    if not os.path.lexists(target):
      try:
        _rename(new, target)  # fails if another export put one there
        return
      except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
          raise
        continue
    try:
      _exchange(new, target)
    except OSError as e:
      if e.errno == errno.ENOENT:
        continue  # `target` went away meanwhile
      if e.errno not in _NO_EXCHANGE:
        raise
    else:
      shutil.rmtree(new, ignore_errors=True)  # `new` holds the old export
      return
    # Fallback: the old export aside, the new one in, the old one deleted.
    aside = _new_temporary(target, "old", create=False)
    try:
      try:
        _rename(target, aside)
      except FileNotFoundError:
        continue
      try:
        _rename(new, target)
      except OSError as e:
        # Put the old one back; or, if another export came in meanwhile,
        # keep that one and drop the old.
        try:
          _rename(aside, target)
        except OSError:
          if os.path.lexists(target):
            shutil.rmtree(aside, ignore_errors=True)
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
          raise
        continue
      shutil.rmtree(aside, ignore_errors=True)
      return
    finally:
      _release(aside)
  raise OSError(errno.EBUSY, f"Could not replace {target}: other exports "
                "kept replacing it.")
