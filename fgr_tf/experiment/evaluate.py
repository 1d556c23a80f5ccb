"""Evaluating a training workdir as its config says: `evaluate_workdir`."""

import json
import os

import keras
import numpy as np

from fgr_tf import attacks as attacks_lib
from fgr_tf import data as data_lib
from fgr_tf import errors
from fgr_tf import evaluation
from fgr_tf import files

# Test images drawn by `fgr-plot`'s gallery (saved by evaluate_workdir).
GALLERY_IMAGES = 6


def attacks_from_config(eval_config):
  """The `Attack`s of a config's `eval` section, labels in order.

  `eval.attacks` maps attack names to settings; every epsilon in
  `eval.flow_pgd_budgets` adds flow-PGD at that budget, labelled
  "flow_pgd@<epsilon>" (its settings record the epsilon).
  """
  specs = [attacks_lib.make(name, **dict(settings))
           for name, settings in eval_config.attacks.items()]
  base = next((a for a in specs if a.name == "flow_pgd"),
              attacks_lib.make("flow_pgd"))
  for epsilon in eval_config.flow_pgd_budgets:
    specs.append(base.replace(label=f"flow_pgd@{epsilon:g}",
                              epsilon=float(epsilon)))
  return specs


def evaluate_workdir(config, workdir, checkpoint="best", output=None,
                     write=True):
  """Evaluates `workdir/<checkpoint>.keras` on the test split.

  Writes `results.json` (the `evaluate` dict, each attack with its
  settings) and `gallery.npz` (what each attack did to the first few test
  images in that evaluation, for `fgr-plot`).

  Args:
    config: the experiment's ConfigDict (data and eval sections).
    workdir: a training workdir.
    checkpoint: "best" or "final".
    output: results path; default `workdir/results.json`.
    write: False returns the results without writing results.json (for a
      caller that adds to them and writes once, like the sweep).

  Returns:
    The `evaluate` dict, plus "checkpoint", "fgr_lambda" and "config".
  """
  if checkpoint not in ("best", "final"):
    raise errors.UserError(f"checkpoint must be 'best' or 'final'. Received: "
                           f"{checkpoint!r}")
  path = os.path.join(workdir, f"{checkpoint}.keras")
  if not os.path.exists(path):
    raise errors.DataNotFoundError(f"No checkpoint {path}: train first "
                                   "(fgr-train --config=... --workdir=...).")
  model = keras.saving.load_model(path)
  images, labels = data_lib.load(
      config.data.name, "test", source=config.data.source or None,
      data_dir=config.data.data_dir or None,
      num_examples=config.eval.num_examples)
  images = data_lib.to_unit_float(images).numpy()
  attacks = attacks_from_config(config.eval)
  results, shown = evaluation.evaluate_with_gallery(
      model, (images, labels), attacks, GALLERY_IMAGES,
      batch_size=config.eval.batch_size)
  results["checkpoint"] = path
  results["fgr_lambda"] = getattr(model, "fgr_lambda", None)
  results["config"] = json.loads(config.to_json_best_effort())
  files.replace_atomically(os.path.join(workdir, "gallery.npz"),
                           lambda tmp: np.savez_compressed(tmp, **shown),
                           suffix=".npz")
  if write:
    files.write_json(results,
                     output or os.path.join(workdir, "results.json"))
  return results
