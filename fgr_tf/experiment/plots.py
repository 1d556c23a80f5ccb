"""Figures from `results.json` / `gallery.npz` files, as PNG.

Every results entry describes its attack (`attack`, `kind`, `settings`,
`budget`): the plots read those, never the labels.
"""

import os

import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fgr_tf import errors  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position


def _entries(results, attack=None, kind=None):
  """[(label, entry)] of a results dict's attacks, filtered."""
  return [(label, e) for label, e in results["attacks"].items()
          if (attack is None or e["attack"] == attack) and
          (kind is None or e["kind"] == kind)]


def plot_lambda_tradeoff(results, path, attack="flow_pgd"):
  """Clean vs adversarial accuracy, one point per lambda (the paper's figure).

  Args:
    results: list of `evaluate_workdir` dicts (each has "fgr_lambda").
    path: PNG path.
    attack: the attack whose smallest-budget entry is plotted.
  """
  points = []
  for r in results:
    entries = sorted(_entries(r, attack, "bounded"),
                     key=lambda le: le[1]["budget"]["value"])
    if entries:
      points.append((r.get("fgr_lambda") or 0.0, r["clean_accuracy"],
                     entries[0][1]["adversarial_accuracy"]))
  if not points:
    raise errors.UserError(f"No results contain the bounded attack "
                           f"{attack!r}.")
  points.sort()
  fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
  lams = [p[0] for p in points]
  ax.plot(lams, [p[1] for p in points], "o-", label="clean")
  ax.plot(lams, [p[2] for p in points], "s-", label=attack)
  return _save(fig, ax, path, "FGR lambda", "accuracy")


def budget_curve(results, attack="flow_pgd"):
  """[(budget value, robust accuracy)] of a bounded attack, with
  (0, clean accuracy) first; the budget unit; sorted."""
  entries = _entries(results, attack, "bounded")
  curve = sorted([(0.0, results["clean_accuracy"])] + [
      (e["budget"]["value"], e["adversarial_accuracy"]) for _, e in entries])
  unit = entries[0][1]["budget"]["unit"] if entries else ""
  return curve, unit


def plot_budget_curves(results, labels, path, attack="flow_pgd"):
  """Robust accuracy vs the budget of a bounded attack (every entry of
  that attack, whatever its label), one curve per model."""
  fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
  unit = ""
  for result, label in zip(results, labels):
    curve, unit = budget_curve(result, attack)
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", label=label)
  return _save(fig, ax, path, f"{attack} budget ({unit})", "robust accuracy")


def deformation_curve(results, label, budgets_px):
  """Robust accuracy of a minimal attack at each T-norm budget (pixels),
  from its per-image T-norms: correct, and the attack failed or needed
  more than the budget."""
  correct = np.asarray(results["correct"], bool)
  t_norms = np.array([np.inf if t is None else t
                      for t in results["attacks"][label]["t_norms"]])
  return [float(np.mean(correct & (t_norms > b))) for b in budgets_px]


def plot_deformation_curves(results, labels, path, max_px=None):
  """Robust accuracy vs deformation budget (T-norm, pixels) under each
  minimal attack (stAdv, ADef), every model in one figure."""
  minimal = [label for label, _ in _entries(results[0], kind="minimal")]
  if not minimal:
    raise errors.UserError("No minimal attacks (stAdv, ADef) in the results.")
  if max_px is None:
    found = [t for r in results for label in minimal
             for t in r["attacks"][label]["t_norms"] if t is not None]
    max_px = float(np.percentile(found, 99)) if found else 1.0
  budgets = np.linspace(0.0, max_px, 101)
  fig, axes = plt.subplots(1, len(minimal), figsize=(4.5 * len(minimal), 3.5),
                           dpi=100, squeeze=False)
  for ax, attack_label in zip(axes[0], minimal):
    for result, label in zip(results, labels):
      ax.plot(budgets, deformation_curve(result, attack_label, budgets),
              label=label)
    ax.set_title(attack_label)
    ax.set_xlabel("deformation budget: T-norm (px)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_minimal_attack_norms(results, labels, path):
  """Grouped bars: median T-norm (pixels) each minimal attack needs, per
  model. Larger is more robust: stAdv and ADef search for the smallest
  deformation that flips the label, so their accuracy is ~0 for every
  model."""
  attacks = [label for label, _ in _entries(results[0], kind="minimal")]
  if not attacks:
    raise errors.UserError("No minimal attacks in the results.")
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  width = 0.8 / len(results)
  for i, (result, label) in enumerate(zip(results, labels)):
    values = [result["attacks"][a]["median_t_norm"] or 0.0 for a in attacks]
    ax.bar(np.arange(len(attacks)) + i * width, values, width, label=label)
  ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
  ax.set_ylabel("median T-norm of successful attacks (px)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize="small", ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_clean_vs_robust(groups, path, xlabel="clean accuracy",
                         ylabel="robust accuracy"):
  """Clean vs robust accuracy, one curve per group (e.g. FGR and IGR over
  their lambdas), mean +- standard deviation over seeds.

  Args:
    groups: {group name: [(point label, [clean per seed], [robust per
      seed])]}.
    path: PNG path.
  """
  fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
  for name, points in groups.items():
    xs = [np.mean(p[1]) for p in points]
    ys = [np.mean(p[2]) for p in points]
    xerr = [np.std(p[1], ddof=1) if len(p[1]) > 1 else 0 for p in points]
    yerr = [np.std(p[2], ddof=1) if len(p[2]) > 1 else 0 for p in points]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=3,
                label=name)
    for x, y, p in zip(xs, ys, points):
      ax.annotate(p[0], (x, y), fontsize="x-small", xytext=(3, 3),
                  textcoords="offset points")
  # Zoomed to the points: the differences are a few points of accuracy.
  return _save(fig, ax, path, xlabel, ylabel, ylim=None)


def flow_to_rgb(flow, max_px=None):
  """Colour wheel of a pixel flow [H, W, 2] (dy, dx): hue = direction,
  brightness = length / max_px (default the flow's largest length)."""
  dy, dx = flow[..., 0], flow[..., 1]
  length = np.hypot(dy, dx)
  max_px = max_px or max(float(length.max()), 1e-12)
  hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
  hsv = np.stack([hue, np.ones_like(hue), np.clip(length / max_px, 0, 1)],
                 axis=-1)
  return matplotlib.colors.hsv_to_rgb(hsv)


def plot_gallery(galleries, labels, path, class_names=None, images=4):
  """What each attack does, per model: for a few test images, the clean
  image, then per attack the deformed image and its flow (colour wheel:
  hue = direction, brightness = length), with the prediction and the
  T-norm (px) under each.

  Args:
    galleries: list of dicts (`fgr_tf.evaluation.gallery`, saved as
      gallery.npz by evaluate_workdir), one per model.
    labels: model names.
    path: PNG path.
    class_names: optional names of the classes.
    images: how many images per model.
  """
  attack_labels = sorted({k.split("/")[0] for g in galleries for k in g
                          if k.endswith("/adv_images")})
  name = (lambda c: class_names[c]) if class_names else str
  columns = 1 + 2 * len(attack_labels)
  rows = sum(min(images, len(g["images"])) for g in galleries)
  fig, axes = plt.subplots(rows, columns, dpi=100, squeeze=False,
                           figsize=(1.25 * columns, 1.45 * rows))
  row = 0
  for gallery, model_label in zip(galleries, labels):
    for i in range(min(images, len(gallery["images"]))):
      shown = [(gallery["images"][i], f"{model_label}\n"
                f"clean: {name(int(gallery['predictions'][i]))}")]
      for a in attack_labels:
        t = float(gallery[f"{a}/t_norm"][i])
        shown.append((gallery[f"{a}/adv_images"][i],
                      f"{a}\n{name(int(gallery[f'{a}/predictions'][i]))}"))
        shown.append((flow_to_rgb(gallery[f"{a}/flow"][i]),
                      f"flow, T {t:.2f} px"))
      for ax, (picture, title) in zip(axes[row], shown):
        picture = np.asarray(picture)
        if picture.shape[-1] == 1:
          ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1)
        else:
          ax.imshow(np.clip(picture, 0, 1))
        ax.set_title(title, fontsize=5)
        ax.axis("off")
      row += 1
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_figures(results, labels, output_dir, galleries=None,
                  attack="flow_pgd"):
  """Every figure the results allow, into `output_dir`; returns the paths.

  lambda_tradeoff.png and budget_curves.png (the bounded `attack`),
  deformation_curves.png and deformation_norms.png (minimal attacks), and
  gallery.png (the models that have a gallery).
  """
  os.makedirs(output_dir, exist_ok=True)
  out = lambda name: os.path.join(output_dir, name)
  paths = [plot_lambda_tradeoff(results, out("lambda_tradeoff.png"), attack),
           plot_budget_curves(results, labels, out("budget_curves.png"),
                              attack)]
  if any(e["kind"] == "minimal" for e in results[0]["attacks"].values()):
    paths += [plot_deformation_curves(results, labels,
                                      out("deformation_curves.png")),
              plot_minimal_attack_norms(results, labels,
                                        out("deformation_norms.png"))]
  shown = [(g, l) for g, l in zip(galleries or [], labels) if g is not None]
  if shown:
    paths.append(plot_gallery([g for g, _ in shown], [l for _, l in shown],
                              out("gallery.png")))
  return paths


def _save(fig, ax, path, xlabel, ylabel, ylim=(0, 1)):
  """Labels an accuracy plot (y in `ylim`; None: matplotlib's), writes the
  PNG, returns path."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
