"""fgr-export --workdir=runs/fmnist_fgr100 [--export_dir=...]

Writes a SavedModel (float32 and uint8 image signatures) for serving.
"""

import os

from absl import app
from absl import flags

from fgr_tf.experiment import apps

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "final"],
                                "Which checkpoint to export.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Output directory (default WORKDIR/saved_model).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import keras  # pylint: disable=g-import-not-at-top
  from fgr_tf import export  # pylint: disable=g-import-not-at-top
  path = os.path.join(_WORKDIR.value, f"{_CHECKPOINT.value}.keras")
  if not os.path.exists(path):
    raise app.UsageError(f"No checkpoint {path}; train first.")
  export_dir = _EXPORT_DIR.value or os.path.join(_WORKDIR.value,
                                                 "saved_model")
  export.export_saved_model(keras.saving.load_model(path), export_dir)
  print(f"SavedModel written to {export_dir}")


def run():
  apps.run(main)


if __name__ == "__main__":
  run()
