"""The attacks under XLA (jit_compile=True, what GPUs run) agree with the
graph path on the same weights and images."""

import keras
import numpy as np
import pytest

import fgr_tf
from fgr_tf import attacks
from fgr_tf import synthetic

SETTINGS = {
    "flow_pgd": dict(epsilon=0.05, steps=10),
    "stadv": dict(steps=30, search_steps=2),
    "stadv_lbfgs": dict(attack="stadv", optimizer="lbfgs", steps=20,
                        search_steps=2),
    "adef": dict(max_iter=10),
    "worst_of_k": dict(max_angle=30.0),  # the 775-transform grid
    "random_flow": dict(epsilon=0.05, tries=5),
}


@pytest.fixture(scope="module")
def model_and_data():
  images, labels = synthetic.shapes(512, size=16, seed=0)
  keras.utils.set_random_seed(0)
  backbone = fgr_tf.backbones.build("small_cnn", 10, (16, 16, 1))
  model = fgr_tf.FGRModel(backbone, fgr_lambda=0.0)
  model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
  model.fit(images, labels, batch_size=64, epochs=3, verbose=0)
  test_images, test_labels = synthetic.shapes(48, size=16, seed=7)
  return backbone, test_images, test_labels


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_attack_agrees_under_xla(model_and_data, name):
  backbone, images, labels = model_and_data
  settings = dict(SETTINGS[name])
  attack = settings.pop("attack", name)
  graph = attacks.make(attack, jit_compile=False, **settings)(
      backbone, images, labels)
  xla = attacks.make(attack, jit_compile=True, **settings)(
      backbone, images, labels)
  # Same decision per image except where float32 round-off (different
  # summation orders) moves a signed step or an argmax: at most 2 of 48
  # images, which a wrong XLA path (e.g. a flipped warp) would far exceed.
  success_graph, success_xla = graph.success.numpy(), xla.success.numpy()
  assert np.sum(success_graph != success_xla) <= 2, (success_graph,
                                                     success_xla)
  both = success_graph & success_xla
  assert both.sum() >= 10, "the test needs attacks that succeed"
  # T-norms (px) of the images both fooled: equal in distribution.
  t_graph, t_xla = graph.t_norm.numpy()[both], xla.t_norm.numpy()[both]
  assert abs(np.median(t_graph) - np.median(t_xla)) <= 0.1 * np.median(
      t_graph) + 1e-6, (np.median(t_graph), np.median(t_xla))
  assert xla.adv_images.shape == images.shape
  assert float(np.max(xla.adv_images)) <= 1.0
