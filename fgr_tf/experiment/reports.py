"""Markdown tables from `results.json` dicts (which describe their attacks).

Attacks are told apart by what each results entry records (`kind`,
`attack`, `budget`), never by parsing labels.
"""

import json
import os

import numpy as np

from fgr_tf import errors


def _fmt(value, spec=".3f"):
  return "n/a" if value is None else format(value, spec)


def bounded(results):
  """Labels of the bounded attacks, grouped by attack then budget."""
  entries = results["attacks"]
  return sorted((k for k, e in entries.items() if e["kind"] == "bounded"),
                key=lambda k: (entries[k]["attack"],
                               entries[k].get("budget", {}).get("value", 0)))


def minimal(results):
  """Labels of the minimal attacks, in results order."""
  return [k for k, e in results["attacks"].items() if e["kind"] == "minimal"]


def format_table(results_by_model):
  """One row per (model, attack) of `evaluate` results."""
  lines = ["| model | attack | clean acc | adv acc | success | median / mean "
           "T-norm (px) | s/image |", "|---|---|---|---|---|---|---|"]
  for model_name, results in results_by_model.items():
    for label, r in results["attacks"].items():
      lines.append(
          f"| {model_name} | {label} | {results['clean_accuracy']:.3f} | "
          f"{r['adversarial_accuracy']:.3f} | {_fmt(r['success_rate'])} | "
          f"{_fmt(r.get('median_t_norm'))} / {_fmt(r['mean_t_norm'])} | "
          f"{r['seconds_per_image']:.4f} |")
  return "\n".join(lines)


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def sweep_tables(runs, overrides):
  """Markdown tables of a sweep: mean ± standard deviation over seeds.

  Args:
    runs: {variant: [results dict per seed]}.
    overrides: {variant: overrides text}.

  Returns:
    Two tables: robust accuracy under the bounded attacks (and train
    minutes), and for the minimal attacks the median T-norm (px) they need
    and the robust accuracy at each deformation budget.
  """
  first = next(iter(runs.values()))[0]
  bounded_labels = bounded(first)
  minimal_labels = minimal(first)
  head = ["variant", "seeds", "settings", "clean"] + bounded_labels + [
      "train min"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, seeds in runs.items():
    cells = [name, str(len(seeds)), f"`{overrides[name]}`",
             _mean_std([r["clean_accuracy"] for r in seeds])]
    cells += [_mean_std([r["attacks"][a]["adversarial_accuracy"]
                         for r in seeds]) for a in bounded_labels]
    minutes = np.mean([r.get("train_seconds", 0) for r in seeds]) / 60
    cells.append(f"{minutes:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  if minimal_labels:
    budgets = list(first["attacks"][minimal_labels[0]].get(
        "robust_accuracy_at_px", {}))
    head = ["variant"]
    for label in minimal_labels:
      head += [f"{label} median T-norm (px)"] + [
          f"{label} acc @{b} px" for b in budgets]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, seeds in runs.items():
      cells = [name]
      for label in minimal_labels:
        cells.append(_mean_std([r["attacks"][label]["median_t_norm"]
                                for r in seeds]))
        cells += [_mean_std([r["attacks"][label]["robust_accuracy_at_px"][b]
                             for r in seeds]) for b in budgets]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def load_results(paths, labels=None):
  """(results dicts, labels, galleries) of results.json files.

  Labels default to each file's directory name; a gallery is the
  gallery.npz beside the results file (None if there is none).
  """
  results, galleries = [], []
  for path in paths:
    if not os.path.exists(path):
      raise errors.DataNotFoundError(
          f"No results file {path!r}: run fgr-evaluate (or fgr-sweep) first.")
    with open(path) as f:
      results.append(json.load(f))
    gallery = os.path.join(os.path.dirname(path), "gallery.npz")
    if os.path.exists(gallery):
      with np.load(gallery) as data:
        galleries.append({k: data[k] for k in data.files})
    else:
      galleries.append(None)
  labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p)))
                      for p in paths]
  if len(labels) != len(results):
    raise errors.UserError(f"{len(labels)} labels for {len(results)} results "
                           "files: give one label per file.")
  return results, labels, galleries
