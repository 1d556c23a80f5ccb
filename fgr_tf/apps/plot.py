"""fgr-plot --results=runs/a/results.json,runs/b/results.json --output_dir=runs

Prints one Markdown table of all results, and draws the original's figure
(clean vs adversarial accuracy per lambda) and robust-accuracy vs flow-PGD
budget curves, as PNG.
"""

import json
import os

from absl import app
from absl import flags

from fgr_tf import apps

_RESULTS = flags.DEFINE_list("results", None, "results.json files.")
_LABELS = flags.DEFINE_list("labels", None, "Curve labels (default: the "
                            "parent directory of each results file).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", ".", "Where to write PNGs.")
_ATTACK = flags.DEFINE_string("attack", "flow_pgd", "Attack to plot.")
flags.mark_flags_as_required(["results"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fgr_tf import errors  # pylint: disable=g-import-not-at-top
  from fgr_tf import evaluation  # pylint: disable=g-import-not-at-top
  from fgr_tf import plots  # pylint: disable=g-import-not-at-top
  results = []
  for path in _RESULTS.value:
    if not os.path.exists(path):
      raise errors.DataNotFoundError(
          f"No results file {path!r}: run fgr-evaluate (or fgr-sweep) first.")
    with open(path) as f:
      results.append(json.load(f))
  labels = _LABELS.value or [os.path.basename(os.path.dirname(
      os.path.abspath(p))) for p in _RESULTS.value]
  if len(labels) != len(results):
    raise app.UsageError("--labels needs one label per results file.")
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  print(evaluation.format_table(dict(zip(labels, results))))
  for path in (
      plots.plot_lambda_tradeoff(results, os.path.join(
          _OUTPUT_DIR.value, "lambda_tradeoff.png"), _ATTACK.value),
      plots.plot_budget_curves(results, labels, os.path.join(
          _OUTPUT_DIR.value, "budget_curves.png"), _ATTACK.value)):
    print(f"wrote {path}")


def run():
  apps.run(main)


if __name__ == "__main__":
  run()
