"""absl entry points behind bin/*.py and the fgr-* console scripts.

Each parses flags, loads a config and calls the experiment layer; nothing
else.
"""

import os
import sys

from fgr_tf import errors


def prepare():
  """Quiets TF's C++ start-up logs (before TensorFlow is imported)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Errors we raise on purpose, whose message says what is wrong and what to
# do (`fgr_tf.errors`): printed without a traceback (set FGR_TF_TRACEBACK=1
# to see it). Anything else is a bug and keeps its traceback.
USER_ERRORS = errors.ONE_LINE_ERRORS


def adopt_key_flags(main):
  """Makes the flags of `main`'s module key flags of the main program, so
  `--helpshort` (and `--help`) list them: absl shows the flags of the
  module named `sys.argv[0]`, which for the console scripts and bin/*.py is
  a small launcher, not the fgr_tf.experiment.apps module that defines
  the flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main):
  """absl.app.run(main), with `USER_ERRORS` printed as one line, exit 1."""
  from absl import app  # pylint: disable=g-import-not-at-top
  prepare()
  adopt_key_flags(main)

  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if os.environ.get("FGR_TF_TRACEBACK"):
        raise
      name = os.path.basename(sys.argv[0])
      sys.exit(f"{name}: error: {type(e).__name__}: {e}")

  app.run(guarded)
