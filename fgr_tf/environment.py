"""The FGR_TF_* environment variables that force a computation path
(README, "Where the speed comes from"), parsed with a clear error.

A misspelt value (`FGR_TF_DEFORM=XLA`, `FGR_TF_GEMM_MAX_PIXELS=16px`)
raises `errors.UserError` naming the variable and its accepted values,
instead of silently taking the other path or failing inside `int()`.
Imports nothing heavy.
"""

import os

from fgr_tf import errors


def choice(name, default, choices):
  """The value of environment variable `name` (`default` if unset), one of
  `choices` (strings)."""
  value = os.environ.get(name, default)
  if value not in choices:
    raise errors.UserError(
        f"The environment variable {name} must be one of "
        f"{', '.join(repr(c) for c in choices)} (unset: {default!r}). "
        f"Received: {name}={value!r}")
  return value


def switch(name, default=True):
  """Environment variable `name` as an on/off switch: "1" or "0"."""
  return choice(name, "1" if default else "0", ("1", "0")) == "1"


def pixels(name, default):
  """Environment variable `name` as a count of pixels: an int >= 0."""
  raw = os.environ.get(name)
  if raw is None:
    return default
  try:
    value = int(raw)
  except ValueError:
    value = -1
  if value < 0:
    raise errors.UserError(
        f"The environment variable {name} must be an integer >= 0 "
        f"(pixels; unset: {default}). Received: {name}={raw!r}")
  return value
