"""bench/reference_attacks.py: the parts that need no reference virtualenv
(weight export, its NumPy forward pass, ART's grid and T-norm, the table)."""

import math

import numpy as np
import pytest

import fgr_tf
from bench import reference_attacks as ref


@pytest.fixture(scope="module")
def small_cnn():
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  backbone = fgr_tf.backbones.build("small_cnn", 10, (28, 28, 1))
  rng = np.random.default_rng(0)
  for name in ("bn0", "bn1"):  # non-trivial inference statistics
    layer = backbone.get_layer(name)
    gamma, beta, mean, var = layer.get_weights()
    layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape),
                       rng.normal(0, 0.1, beta.shape),
                       rng.normal(0, 0.1, mean.shape),
                       rng.uniform(0.5, 2.0, var.shape)])
  return backbone


def test_exported_weights_give_keras_logits(small_cnn):
  weights = ref.export_small_cnn(small_cnn)
  assert weights["conv0/kernel"].shape == (3, 3, 1, 32)
  assert weights["fc/kernel"].shape == (7 * 7 * 64, 128)
  assert float(weights["bn1/epsilon"]) == pytest.approx(1e-5)
  images = np.random.default_rng(1).uniform(size=(4, 28, 28, 1)).astype(
      np.float32)
  keras_logits = small_cnn(images, training=False).numpy()
  np.testing.assert_allclose(ref.numpy_forward(weights, images),
                             keras_logits, rtol=0, atol=1e-5)
  # Flattening in NCHW order instead (the usual PyTorch port) is wrong.
  assert np.abs(keras_logits).max() > 0.1


def test_export_rejects_other_models():
  from helpers import tiny_backbone  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError):
    ref.export_small_cnn(tiny_backbone())


def test_art_grid_and_rigid_t_norm():
  grid = ref.art_grid(28, 28, **ref.ART_GRID)
  assert len(grid) == 5 * 5 * 31
  assert sorted({g[0] for g in grid}) == [-3, -2, 0, 2, 3]  # 2.8 px rounded
  assert grid[0] == (-3, -3, -30.0)
  assert ref.art_rigid_t_norm(28, 28, 3, -4, 0.0) == pytest.approx(5.0)
  # A rotation moves the corners most: 2 sin(a/2) * their distance.
  corner = math.hypot(13.5, 13.5)
  assert ref.art_rigid_t_norm(28, 28, 0, 0, 30.0) == pytest.approx(
      2 * math.sin(math.radians(15)) * corner)


def test_summary_table_and_paired_difference():
  correct = np.array([True, True, True, False])
  summary = ref.summarize(correct, success=[True, False, True, True],
                          t_norm=[1.0, 9.0, 3.0, 7.0],
                          adv_correct=[False, True, False, False],
                          seconds=2.0)
  assert summary == {"success_rate": pytest.approx(2 / 3),
                     "mean_t_norm": 2.0, "median_t_norm": 2.0,
                     "robust_accuracy": 0.25, "seconds_per_image": 0.5}
  table = ref.format_table([dict(attack="ADef", model="baseline",
                                 implementation="fgr_tf adef", **summary)])
  assert table.splitlines()[-1] == (
      "| ADef | baseline | fgr_tf adef | 0.667 | 2.000 | 2.000 | 0.250 | "
      "0.5000 |")
  paired = ref.paired_difference(correct, [True, True, False, True],
                                 [True, False, True, True])
  assert paired["difference"] == 0 and paired["disagreements"] == 2
  assert paired["standard_error"] == pytest.approx(math.sqrt(2) / 4)


def test_rows_cover_both_sides_of_each_attack():
  rows = ref.rows_for(ref.ATTACKS, [0.01, 0.05])
  sides = {}
  for attack, side, _, _ in rows:
    sides.setdefault(attack, set()).add(side)
  assert all(s == {"tf", "reference"} for s in sides.values())
  assert len(sides) == 2 + 3
  with pytest.raises(ValueError, match="Unknown attack"):
    ref.rows_for(["fgsm"], [])
