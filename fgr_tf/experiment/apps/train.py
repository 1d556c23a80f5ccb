"""fgr-train --config=configs/fashion_mnist.py --workdir=runs/fmnist_fgr100

Trains as the config says; rerun with the same --workdir to resume.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fgr_tf.experiment import apps

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "logs and results (resumes if it has some).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fgr_tf.experiment import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  apps.run(main)


if __name__ == "__main__":
  run()
