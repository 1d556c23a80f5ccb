"""fgr-evaluate --config=configs/fashion_mnist.py --workdir=runs/fmnist_fgr100

Attacks the trained model on the test split; writes workdir/results.json and
prints a Markdown table.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fgr_tf.experiment import apps

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment's config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "final"],
                                "Which checkpoint to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fgr_tf.experiment import evaluate  # pylint: disable=g-import-not-at-top
  from fgr_tf.experiment import reports  # pylint: disable=g-import-not-at-top
  results = evaluate.evaluate_workdir(_CONFIG.value, _WORKDIR.value,
                                      _CHECKPOINT.value)
  print(reports.format_table({_WORKDIR.value: results}))


def run():
  apps.run(main)


if __name__ == "__main__":
  run()
