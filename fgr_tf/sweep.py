"""The paper's comparison: train and evaluate variants of one config.

A sweep config is an experiment config with a `sweep` section:

  config.sweep.variants = (("baseline", "fgr.lam=0"),
                           ("igr1", "fgr.lam=0 igr.lam=1"),
                           ("fgr100_at", "fgr.lam=100 adv.attack=flow_pgd"))
  config.sweep.only = ""       # comma-separated subset of the names

Each variant is the config with its overrides (space-separated
`field.path=value`, values as Python literals or bare strings) applied. It
trains into `workdir/<name>` (resuming like `fgr-train`), is evaluated like
`fgr-evaluate` (same attacks and budgets for every variant), and its
`results.json` plus wall times are kept, so that an interrupted sweep picks
up where it stopped. Finally `workdir/RESULTS.md` holds the tables and
`workdir/*.png` the plots.
"""

import ast
import copy
import json
import os
import time

from absl import logging

from fgr_tf import errors
from fgr_tf import evaluation
from fgr_tf import files
from fgr_tf import plots
from fgr_tf import train

# Minimal attacks: adversarial accuracy is ~0 for every model, robustness
# shows in the size of the deformation they need (mean T-norm, pixels).
MINIMAL_ATTACKS = ("stadv", "adef")


def parse_overrides(text):
  """'a.b=1 c=x' -> [("a.b", 1), ("c", "x")]."""
  overrides = []
  for item in text.split():
    path, sep, raw = item.partition("=")
    if not sep or not path:
      raise errors.UserError(
          f"Bad override {item!r}: expected field.path=value.")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    overrides.append((path, value))
  return overrides


def apply_overrides(config, text, name="variant"):
  """A copy of `config` with the overrides in `text` applied."""
  config = copy.deepcopy(config)
  for path, value in parse_overrides(text):
    *parents, leaf = path.split(".")
    node = config
    try:
      for parent in parents:
        node = node[parent]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError) as e:
      raise errors.UserError(f"{name}: unknown config field {path!r}.") from e
    except TypeError as e:
      raise errors.UserError(f"{name}: bad value for {path!r}: {e}") from e
  return config


def variant_overrides(config):
  """{name: overrides text} of `config.sweep.variants`, in its order."""
  specs = {}
  for entry in config.sweep.variants:
    if len(entry) != 2 or not all(isinstance(e, str) for e in entry):
      raise errors.UserError("sweep.variants must hold (name, overrides) "
                             f"string pairs. Received: {entry!r}")
    if entry[0] in specs:
      raise errors.UserError(f"Variant {entry[0]!r} appears twice in "
                             "sweep.variants.")
    specs[entry[0]] = entry[1]
  return specs


def variants(config):
  """{name: config} of the sweep, in the config's order (or `only`'s)."""
  specs = variant_overrides(config)
  names = [n.strip() for n in config.sweep.only.split(",") if n.strip()]
  for name in names:
    if name not in specs:
      raise errors.UserError(f"Unknown variant {name!r} in sweep.only. "
                             f"Expected some of {list(specs)}.")
  return {name: apply_overrides(config, specs[name], name)
          for name in (names or specs)}


def run_variant(config, workdir):
  """Trains and evaluates one variant; returns its results with timings.

  A variant whose `results.json` exists is not run again: the file is
  written once, atomically, with the timings, so it exists only complete.
  """
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    start = time.time()
    train.train_and_evaluate(config, workdir)
    trained = time.time()
    results = evaluation.evaluate_workdir(config, workdir, write=False)
    results["train_seconds"] = trained - start
    results["eval_seconds"] = time.time() - trained
    files.write_json(results, path)
  with open(path) as f:
    return json.load(f)


def run_sweep(config, workdir):
  """Runs every variant, then writes RESULTS.md and the plots.

  Returns:
    {variant name: results dict}.
  """
  import keras  # pylint: disable=g-import-not-at-top
  all_variants = variants(config)
  overrides = variant_overrides(config)
  results = {}
  for i, (name, variant_config) in enumerate(all_variants.items()):
    logging.info("Variant %d/%d: %s (%s)", i + 1, len(all_variants), name,
                 overrides[name])
    keras.backend.clear_session()
    results[name] = run_variant(variant_config,
                                os.path.join(workdir, name))
  write_report(config, results, workdir)
  return results


def markdown_tables(results, overrides):
  """Two Markdown tables: adversarial accuracy, and the mean deformation
  (pixels) the minimal attacks (stAdv, ADef) need."""
  first = next(iter(results.values()))
  bounded = sorted((a for a in first["attacks"] if a not in MINIMAL_ATTACKS),
                   key=lambda a: (a.split("@")[0], a))
  minimal = [a for a in first["attacks"] if a in MINIMAL_ATTACKS]
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  head = ["variant", "settings", "clean"]
  lines = ["| " + " | ".join(head + bounded + ["train min"]) + " |",
           "|" + "---|" * (len(head) + len(bounded) + 1)]
  for name, r in results.items():
    cells = [name, f"`{overrides[name]}`", fmt(r["clean_accuracy"])]
    cells += [fmt(r["attacks"][a]["adversarial_accuracy"]) for a in bounded]
    cells.append(f"{r.get('train_seconds', 0) / 60:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  if minimal:
    lines += ["", "| " + " | ".join(
        ["variant"] + [f"{a} adv acc / success / mean T-norm (px)"
                       for a in minimal]) + " |",
              "|" + "---|" * (len(minimal) + 1)]
    for name, r in results.items():
      cells = [name] + [" / ".join(fmt(r["attacks"][a][k]) for k in (
          "adversarial_accuracy", "success_rate", "mean_t_norm"))
                        for a in minimal]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(config, results, workdir):
  """RESULTS.md (tables, settings, wall time) and the PNG plots."""
  overrides = variant_overrides(config)
  names = list(results)
  plot_paths = [
      plots.plot_budget_curves([results[n] for n in names], names,
                               os.path.join(workdir, "budget_curves.png")),
      plots.plot_minimal_attack_norms(
          [results[n] for n in names], names, MINIMAL_ATTACKS,
          os.path.join(workdir, "deformation_norms.png")),
  ]
  fgr_only = [results[n] for n in names
              if not results[n]["config"]["igr"]["lam"]
              and not results[n]["config"]["adv"]["attack"]]
  if len(fgr_only) > 1:
    plot_paths.append(plots.plot_lambda_tradeoff(
        fgr_only, os.path.join(workdir, "lambda_tradeoff.png")))
  total = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0)
              for r in results.values())
  first = next(iter(results.values()))
  text = [
      "# Sweep results", "",
      f"{len(results)} variants, each evaluated on the first "
      f"{first['num_examples']} test images; train + eval wall time "
      f"{total / 60:.1f} min.", "",
      markdown_tables(results, overrides), "",
      "Attack settings: `" + json.dumps(first["config"]["eval"]["attacks"])
      + "`", "",
  ] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
       for p in plot_paths]
  files.write_text(os.path.join(workdir, "RESULTS.md"), "\n".join(text) + "\n")
  files.write_json(results, os.path.join(workdir, "sweep.json"))
  return plot_paths
