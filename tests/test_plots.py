"""fgr-plot's figures read what results record, not labels."""

import numpy as np

from fgr_tf.experiment import plots
from fgr_tf.experiment import reports

PNG = b"\x89PNG\r\n\x1a\n"


def _results(clean, t_norms, correct, pgd):
  """A results dict as `evaluate` writes it (one minimal, two bounded)."""
  entry = lambda eps, acc: {
      "attack": "flow_pgd", "kind": "bounded", "settings": {"epsilon": eps},
      "budget": {"name": "epsilon", "value": eps,
                 "unit": "L-inf normalized flow"},
      "adversarial_accuracy": acc, "success_rate": 0.5, "mean_t_norm": 0.1,
      "median_t_norm": 0.1, "max_t_norm": 0.2, "seconds_per_image": 0.01}
  found = [t for t in t_norms if t is not None]
  return {
      "clean_accuracy": clean, "correct": correct, "fgr_lambda": 0.0,
      "num_examples": len(correct),
      "attacks": {
          # Labels say nothing: the entries say what they are.
          "a": entry(0.01, pgd[0]), "b": entry(0.05, pgd[1]),
          "c": {"attack": "adef", "kind": "minimal", "settings": {},
                "adversarial_accuracy": 0.0, "success_rate": 1.0,
                "t_norms": t_norms, "median_t_norm": float(np.median(found)),
                "mean_t_norm": float(np.mean(found)),
                "max_t_norm": max(found), "seconds_per_image": 0.01,
                "robust_accuracy_at_px": {}}}}


def test_curves_come_from_the_recorded_budgets_and_t_norms(tmp_path):
  results = _results(0.75, [0.2, None, 0.8, None],
                     [True, True, True, False], pgd=(0.5, 0.25))
  curve, unit = plots.budget_curve(results, "flow_pgd")
  assert curve == [(0.0, 0.75), (0.01, 0.5), (0.05, 0.25)]
  assert unit == "L-inf normalized flow"
  # Robust at b px: correct and (attack failed or needed more than b).
  # Image 1 resisted; image 3 was wrong to start with.
  assert plots.deformation_curve(results, "c", [0.0, 0.5, 1.0]) == [
      0.75, 0.5, 0.25]
  assert reports.bounded(results) == ["a", "b"]
  assert reports.minimal(results) == ["c"]


def test_write_figures_and_gallery(tmp_path):
  rng = np.random.default_rng(0)
  results = [_results(0.75, [0.2, None, 0.8, None],
                      [True, True, True, False], pgd=(0.5, 0.25)),
             _results(0.5, [0.9, 1.2, None, None],
                      [True, True, False, False], pgd=(0.4, 0.3))]
  gallery = {"images": rng.random((2, 8, 8, 1)), "labels": np.array([1, 2]),
             "predictions": np.array([1, 2])}
  for label in ("c", "a"):
    gallery[f"{label}/adv_images"] = rng.random((2, 8, 8, 1))
    gallery[f"{label}/flow"] = rng.normal(size=(2, 8, 8, 2))
    gallery[f"{label}/predictions"] = np.array([3, 2])
    gallery[f"{label}/t_norm"] = np.array([0.5, 0.7])
  paths = plots.write_figures(results, ["m1", "m2"], str(tmp_path),
                              [gallery, None])
  names = sorted(p.split("/")[-1] for p in paths)
  assert names == ["budget_curves.png", "deformation_curves.png",
                   "deformation_norms.png", "gallery.png",
                   "lambda_tradeoff.png"]
  for path in paths:
    assert open(path, "rb").read(8) == PNG
  # The flow colour wheel: direction -> hue, length -> brightness.
  rgb = plots.flow_to_rgb(np.array([[[0.0, 1.0], [0.0, 0.5], [0, 0]]]))
  assert rgb.shape == (1, 3, 3)
  np.testing.assert_allclose(rgb[0, 0], [1, 0, 0])  # +x: red, full length
  np.testing.assert_allclose(rgb[0, 1], [0.5, 0, 0])  # half as long
  np.testing.assert_allclose(rgb[0, 2], [0, 0, 0])  # no motion: black
