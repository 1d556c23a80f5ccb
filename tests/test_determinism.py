"""Same seed, same result: training (bitwise, op determinism) and attacks."""

import keras
import numpy as np
import pytest

import fgr_tf
from fgr_tf import attacks
from fgr_tf import synthetic
from helpers import run_app


def _final_weights(workdir):
  return keras.saving.load_model(workdir / "final.keras").get_weights()


@pytest.mark.slow
def test_two_seeded_training_runs_give_bitwise_identical_weights(tmp_path):
  args = ["--config=configs/smoke.py", "--config.deterministic=True",
          "--config.adv.attack=flow_pgd", "--config.adv.random_start=True",
          "--config.adv.steps=2",
          "--config.eval.callback.every_n_epochs=0"]  # weights only
  for name in ("a", "b", "other_seed"):
    extra = ["--config.seed=1"] if name == "other_seed" else []
    run_app("train", *args, *extra, f"--workdir={tmp_path / name}")
  a, b, other = (_final_weights(tmp_path / n) for n in ("a", "b",
                                                         "other_seed"))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(a, other))


@pytest.mark.parametrize("name", ["stadv", "adef", "flow_pgd", "worst_of_k"])
def test_attacks_are_reproducible(name):
  images, labels = synthetic.shapes(8, size=12, seed=0)
  keras.utils.set_random_seed(0)
  model = fgr_tf.backbones.build("small_cnn", 10, (12, 12, 1))
  settings = {"stadv": dict(steps=5), "adef": dict(max_iter=3),
              "flow_pgd": dict(steps=3, random_start=True, seed=5),
              "worst_of_k": dict(tries=3, seed=5)}[name]
  first = attacks.make(name)(model, images, labels, **settings)
  again = attacks.make(name)(model, images, labels, **settings)
  np.testing.assert_array_equal(first.adv_images, again.adv_images)
  np.testing.assert_array_equal(first.flow, again.flow)
