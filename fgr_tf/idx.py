"""Reader for MNIST-format IDX files (plain or gzipped)."""

import gzip
import os
import struct

import numpy as np

from fgr_tf import errors

# IDX type codes -> numpy dtypes (big-endian).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
           0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
  """Reads an IDX file (e.g. train-images-idx3-ubyte[.gz]) into an array.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not IDX or is truncated.
  """
  if not os.path.exists(path):
    raise errors.DataNotFoundError(f"IDX file not found: {path}")
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise errors.UserError(f"{path} is not a readable IDX file: {e}") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
    raise errors.UserError(f"{path} is not an IDX file (bad magic number).")
  dtype = np.dtype(_DTYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise errors.UserError(f"{path} is truncated: header of {header} bytes, "
                           f"file of {len(data)}.")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise errors.UserError(f"{path} is truncated or corrupt: shape {shape} "
                           f"needs {expected} bytes, file has {len(data)}.")
  return np.frombuffer(data, dtype, offset=header).reshape(shape)
