"""Errors we raise on purpose, with a message that says what to do.

The fgr-* tools print these on one line (no traceback; set
FGR_TF_TRACEBACK=1 to see it); any other exception is a bug and keeps its
traceback.

  from fgr_tf.errors import UserError
  raise UserError(f"fgr_lambda must be >= 0. Received: fgr_lambda={lam}")

This module imports nothing heavy (no TensorFlow), so the apps can use it
before parsing flags.
"""


class UserError(ValueError):
  """Bad input, settings or environment, named in the message.

  A ValueError, so `except ValueError` (and tests expecting one) still
  catch it.
  """


class DataNotFoundError(UserError, FileNotFoundError):
  """A file or data set the user must provide (data, a checkpoint) is
  missing; the message says how to get it. Also a FileNotFoundError."""


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf; the workdir keeps the last good state.

  Not a bug: the tools print it on one line, like a `UserError`.
  (`fgr_tf.experiment.train.TrainingDiverged` is this class.)
  """


# What the fgr-* tools print on one line.
ONE_LINE_ERRORS = (UserError, TrainingDiverged)
