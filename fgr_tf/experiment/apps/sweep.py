"""fgr-sweep --config=configs/sweep_fashion_mnist.py --workdir=runs/sweep

Trains and evaluates every variant of the config's `sweep` section (see
`fgr_tf.experiment.sweep`); rerun with the same --workdir to resume. Writes
WORKDIR/RESULTS.md and the plots, and prints the tables. --report_only
writes them from the runs finished so far.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fgr_tf.experiment import apps

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A sweep config file (with a `sweep` section).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per "
                               "variant; RESULTS.md and PNGs at the top.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: write RESULTS.md and the plots "
    "from the runs finished so far (while a sweep runs, or after one was "
    "interrupted).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if "sweep" not in _CONFIG.value:
    raise app.UsageError("The config has no `sweep` section; see "
                         "configs/sweep_fashion_mnist.py.")
  from fgr_tf.experiment import sweep  # pylint: disable=g-import-not-at-top
  if _REPORT_ONLY.value:
    results = sweep.finished_runs(_CONFIG.value, _WORKDIR.value)
    if not results:
      raise app.UsageError(f"No finished runs under {_WORKDIR.value}.")
    sweep.write_report(_CONFIG.value, results, _WORKDIR.value)
  else:
    results = sweep.run_sweep(_CONFIG.value, _WORKDIR.value)
  from fgr_tf.experiment import reports  # pylint: disable=g-import-not-at-top
  print(reports.sweep_tables(results, sweep.variant_overrides(_CONFIG.value)))


def run():
  apps.run(main)


if __name__ == "__main__":
  run()
