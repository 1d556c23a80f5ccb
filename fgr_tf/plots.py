"""The original's figures from `results.json` files, as PNG."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

from fgr_tf import errors  # noqa: E402  pylint: disable=g-import-not-at-top


def plot_lambda_tradeoff(results, path, attack="flow_pgd"):
  """Clean vs adversarial accuracy, one point per lambda (the paper's figure).

  Args:
    results: list of `evaluate_workdir` dicts (each has "fgr_lambda").
    path: PNG path.
    attack: which attack's adversarial accuracy to plot.
  """
  points = sorted((r.get("fgr_lambda") or 0.0, r["clean_accuracy"],
                   r["attacks"][attack]["adversarial_accuracy"])
                  for r in results if attack in r["attacks"])
  if not points:
    raise errors.UserError(f"No results contain attack {attack!r}.")
  fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
  lams = [p[0] for p in points]
  ax.plot(lams, [p[1] for p in points], "o-", label="clean")
  ax.plot(lams, [p[2] for p in points], "s-", label=f"{attack}")
  return _save(fig, ax, path, "FGR lambda", "accuracy")


def plot_budget_curves(results, labels, path, attack="flow_pgd"):
  """Robust accuracy vs flow-PGD budget (epsilon, normalized), per model.

  Uses the "flow_pgd" entry and every "flow_pgd@<eps>" entry.
  """
  fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
  for result, label in zip(results, labels):
    curve = [(0.0, result["clean_accuracy"])]
    for name, r in result["attacks"].items():
      if name == attack:
        eps = result["config"]["eval"]["attacks"][attack]["epsilon"]
      elif name.startswith(attack + "@"):
        eps = float(name.split("@")[1])
      else:
        continue
      curve.append((eps, r["adversarial_accuracy"]))
    curve.sort()
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", label=label)
  return _save(fig, ax, path, f"{attack} epsilon (normalized flow)",
               "robust accuracy")


def plot_minimal_attack_norms(results, labels, attacks, path):
  """Grouped bars: mean T-norm (pixels) each minimal attack needs, per model.

  Larger is more robust: stAdv and ADef search for the smallest deformation
  that flips the label, so their accuracy is ~0 for every model.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  attacks = [a for a in attacks if a in results[0]["attacks"]]
  if not attacks:
    raise errors.UserError("No minimal attacks in the results.")
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  width = 0.8 / len(results)
  for i, (result, label) in enumerate(zip(results, labels)):
    values = [result["attacks"][a]["mean_t_norm"] or 0.0 for a in attacks]
    ax.bar(np.arange(len(attacks)) + i * width, values, width, label=label)
  ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
  ax.set_ylabel("mean T-norm of successful attacks (px)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize="small", ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _save(fig, ax, path, xlabel, ylabel):
  """Labels an accuracy plot (y in [0, 1]), writes the PNG, returns path."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
