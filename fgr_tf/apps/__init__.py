"""absl entry points behind bin/*.py and the fgr-* console scripts.

Each parses flags, loads a config and calls the library; nothing else.
"""

import os
import sys


def prepare():
  """Quiets TF's C++ logs and puts the current directory on sys.path, so
  config files under ./configs can `from configs import default` when run
  as console scripts (run them from the repository root)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
