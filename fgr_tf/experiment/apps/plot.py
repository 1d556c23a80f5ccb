"""fgr-plot --results=runs/a/results.json,runs/b/results.json --output_dir=runs

Prints one Markdown table of all results and writes, as PNG: the original's
figure (clean vs adversarial accuracy per lambda), robust accuracy vs the
flow-PGD budget, robust accuracy vs deformation budget (T-norm, px) under
stAdv and ADef, and a gallery of what each attack does (from the
gallery.npz beside each results file).
"""

import json
import os

from absl import app
from absl import flags

from fgr_tf.experiment import apps

_RESULTS = flags.DEFINE_list("results", None, "results.json files.")
_LABELS = flags.DEFINE_list("labels", None, "Curve labels (default: the "
                            "parent directory of each results file).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", ".", "Where to write PNGs.")
_ATTACK = flags.DEFINE_string("attack", "flow_pgd", "Attack to plot.")
flags.mark_flags_as_required(["results"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fgr_tf.experiment import plots  # pylint: disable=g-import-not-at-top
  from fgr_tf.experiment import reports  # pylint: disable=g-import-not-at-top
  results, labels, galleries = reports.load_results(_RESULTS.value,
                                                    _LABELS.value)
  print(reports.format_table(dict(zip(labels, results))))
  for path in plots.write_figures(results, labels, _OUTPUT_DIR.value,
                                  galleries, _ATTACK.value):
    print(f"wrote {path}")


def run():
  apps.run(main)


if __name__ == "__main__":
  run()
