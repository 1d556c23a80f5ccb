"""The paper's comparison: train and evaluate variants of one config.

A sweep config is an experiment config with a `sweep` section:

  config.sweep.variants = (("baseline", "fgr.lam=0"),
                           ("igr1", "fgr.lam=0 igr.lam=1"),
                           ("fgr100_at", "fgr.lam=100 adv.attack=flow_pgd"))
  config.sweep.only = ""       # comma-separated subset of the names
  config.sweep.seeds = (0, 1, 2)  # each variant trained with each seed

Each variant is the config with its overrides (space-separated
`field.path=value`, values as Python literals or bare strings) applied. For
each seed it trains into `workdir/<name>/seed<k>` (resuming like
`fgr-train`), is evaluated like `fgr-evaluate` (same attacks, budgets and
test images for every variant and seed), and its `results.json` with wall
times is written once, so that an interrupted sweep picks up where it
stopped. Finally `workdir/RESULTS.md` holds the tables (mean +- standard
deviation over seeds) and `workdir/*.png` the plots.
"""

import ast
import copy
import json
import os
import time

from absl import logging

import numpy as np

from fgr_tf import errors
from fgr_tf import files
from fgr_tf.experiment import evaluate
from fgr_tf.experiment import plots
from fgr_tf.experiment import reports
from fgr_tf.experiment import train


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
  """Trains and evaluates one variant with one seed; returns its results
  with timings.

  A run whose `results.json` exists is not run again: the file is written
  once, atomically, with the timings, so it exists only complete.
  """
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    start = time.time()
    train.train_and_evaluate(config, workdir)
    trained = time.time()
    results = evaluate.evaluate_workdir(config, workdir, write=False)
    results["train_seconds"] = trained - start
    results["eval_seconds"] = time.time() - trained
    files.write_json(results, path)
  with open(path) as f:
    return json.load(f)


def seeds(config):
  """The sweep's seeds (`sweep.seeds`, default the config's own seed)."""
  values = tuple(config.sweep.get("seeds", ())) or (config.seed,)
  if len(set(values)) != len(values):
    raise errors.UserError(f"sweep.seeds repeats a seed: {values}")
  return values


def run_sweep(config, workdir):
  """Runs every variant with every seed, then writes RESULTS.md and plots.

  Returns:
    {variant name: [results dict per seed]}.
  """
  import keras  # pylint: disable=g-import-not-at-top
  all_variants = variants(config)
  overrides = variant_overrides(config)
  runs = {name: [] for name in all_variants}
  total = len(all_variants) * len(seeds(config))
  done = 0
  # Seeds outermost: an interrupted sweep has compared every variant on the
  # first seeds before it starts the next.
  for seed in seeds(config):
    for name, variant_config in all_variants.items():
      done += 1
      logging.info("Run %d/%d: %s seed %d (%s)", done, total, name, seed,
                   overrides[name])
      keras.backend.clear_session()
      seeded = copy.deepcopy(variant_config)
      seeded.seed = seed
      runs[name].append(run_variant(
          seeded, os.path.join(workdir, name, f"seed{seed}")))
  write_report(config, runs, workdir)
  return runs


def finished_runs(config, workdir):
  """The runs of a sweep that have finished so far, for a report while it
  runs or after it was interrupted.

  Returns:
    {variant name: [results dict per finished seed]}, in the config's
    order; variants with no finished seed are left out.
  """
  runs = {}
  for name in variants(config):
    for seed in seeds(config):
      path = os.path.join(workdir, name, f"seed{seed}", "results.json")
      if os.path.exists(path):
        with open(path) as f:
          runs.setdefault(name, []).append(json.load(f))
  return runs


def merge_seeds(results_per_seed):
  """One results dict for plots: per-image records concatenated over the
  seeds, accuracies and medians averaged."""
  first = results_per_seed[0]
  merged = dict(first, correct=[c for r in results_per_seed
                                for c in r["correct"]])
  merged["clean_accuracy"] = float(np.mean(
      [r["clean_accuracy"] for r in results_per_seed]))
  merged["attacks"] = {}
  for label, entry in first["attacks"].items():
    runs = [r["attacks"][label] for r in results_per_seed]
    combined = dict(entry)
    for key in ("adversarial_accuracy", "median_t_norm", "mean_t_norm"):
      values = [e[key] for e in runs if e.get(key) is not None]
      combined[key] = float(np.mean(values)) if values else None
    if "t_norms" in entry:
      combined["t_norms"] = [t for e in runs for t in e["t_norms"]]
    merged["attacks"][label] = combined
  return merged


def _lambda_groups(config, runs, robust_label):
  """FGR and IGR variants (no adversarial training) as clean-vs-robust
  points per lambda, the baseline (both 0) in each."""
  groups = {"FGR": [], "IGR": []}
  for name, results in runs.items():
    lams = results[0]["config"]
    fgr, igr = lams["fgr"]["lam"], lams["igr"]["lam"]
    if lams["adv"]["attack"] or (fgr and igr):
      continue
    point = (name, [r["clean_accuracy"] for r in results],
             [r["attacks"][robust_label]["adversarial_accuracy"]
              for r in results])
    for group, lam in (("FGR", fgr), ("IGR", igr)):
      if lam or not (fgr or igr):
        groups[group].append((lam,) + point)
  return {g: [p[1:] for p in sorted(points)] for g, points in groups.items()
          if len(points) > 1}


def write_report(config, runs, workdir):
  """RESULTS.md (tables with standard deviations, settings, wall time) and
  the PNG plots."""
  overrides = variant_overrides(config)
  names = list(runs)
  merged = [merge_seeds(runs[n]) for n in names]
  first = runs[names[0]][0]
  plot_paths = [plots.plot_budget_curves(
      merged, names, os.path.join(workdir, "budget_curves.png"))]
  if reports.minimal(first):
    plot_paths += [
        plots.plot_deformation_curves(
            merged, names, os.path.join(workdir, "deformation_curves.png")),
        plots.plot_minimal_attack_norms(
            merged, names, os.path.join(workdir, "deformation_norms.png"))]
  robust_label = config.sweep.get("robust_label", "flow_pgd")
  groups = _lambda_groups(config, runs, robust_label)
  if groups:
    plot_paths.append(plots.plot_clean_vs_robust(
        groups, os.path.join(workdir, "clean_vs_robust.png"),
        ylabel=f"robust accuracy ({robust_label})"))
  total = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0)
              for results in runs.values() for r in results)
  counts = sorted({len(results) for results in runs.values()})
  seeds_text = (str(counts[0]) if len(counts) == 1
                else f"{counts[0]}-{counts[-1]} (column `seeds`)")
  text = [
      "# Sweep results", "",
      f"{len(runs)} variants x {seeds_text} seeds (mean ± standard "
      f"deviation over seeds), each evaluated on the first "
      f"{first['num_examples']} test images; train + eval wall time "
      f"{total / 60:.1f} min.", "",
      reports.sweep_tables(runs, overrides), "",
      "Attacks: `" + json.dumps({label: {k: e[k] for k in ("attack",
                                                          "settings")}
                                 for label, e in first["attacks"].items()})
      + "`", "",
  ] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
       for p in plot_paths]
  files.write_text(os.path.join(workdir, "RESULTS.md"), "\n".join(text) + "\n")
  files.write_json(runs, os.path.join(workdir, "sweep.json"))
  return plot_paths
