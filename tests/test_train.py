"""fgr_tf.experiment.train: schedule, adversarial training hook, validation."""

import dataclasses
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import synthetic
from fgr_tf.experiment import train
from fgr_tf.experiment.configs import smoke
from helpers import U32, assert_close_float32, assert_weights_close
from helpers import copy_of, float32_tolerance

# Round-off of a bilinear warp of pixels in [0, 1] (4 terms): inputs an
# attack leaves alone may differ by it (a warp with a zero flow), changed
# ones differ by whole deformations (>= 1e-2).
WARP_ROUND_OFF = float32_tolerance(1.0, reduction=4)


def test_learning_rate_schedule_steps_down_at_the_configured_epochs():
  config = smoke.get_config()
  config.train.learning_rate = 0.1
  config.train.lr_decay_epochs = (2, 3)
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  lrs = [float(schedule(step)) for step in (0, 19, 21, 29, 31)]
  # Python floats rounded once to float32, no sums: element-wise u.
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=U32)


def _adversarial_setup(n=8):
  images, labels = synthetic.shapes(n, seed=0)
  keras.utils.set_random_seed(0)
  backbone = fgr_tf.backbones.build("small_cnn", 10, (28, 28, 1))
  return images, labels, backbone


@pytest.mark.parametrize("attack", ["flow_pgd", "stadv"])
def test_adversarial_training_attack_changes_the_inputs(attack):
  config = smoke.get_config()
  assert train.make_adversary(config) is None
  config.adv.attack = attack
  config.adv.epsilon = 0.02
  config.adv.steps = 2
  images, labels, backbone = _adversarial_setup()
  adv = train.make_adversary(config)(backbone, images, labels,
                                     tf.constant([0, 1])).numpy()
  assert adv.shape == images.shape
  changed = (np.abs(adv - images).reshape(len(images), -1).max(1) >
             WARP_ROUND_OFF)
  if attack == "flow_pgd":
    assert changed.all()
  else:  # stAdv leaves inputs the model already gets wrong as they are.
    correct = np.argmax(backbone(images), -1) == labels
    assert correct.any() and changed[correct].all()
  assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_stadv_adversary_uses_the_configured_search_steps(monkeypatch):
  config = smoke.get_config()
  config.adv.attack = "stadv"
  config.adv.steps = 2
  assert config.adv.search_steps == 1  # the default keeps training cheap
  config.adv.search_steps = 3
  calls = []
  stadv = fgr_tf.attacks.stadv

  @functools.wraps(stadv)
  def recording_stadv(*args, **settings):
    calls.append(settings)
    return stadv(*args, **settings)

  monkeypatch.setitem(fgr_tf.attacks.REGISTRY, "stadv", dataclasses.replace(
      fgr_tf.attacks.REGISTRY["stadv"], function=recording_stadv))
  images, labels, backbone = _adversarial_setup(4)
  adversary = train.make_adversary(config)
  tf.function(lambda x, y: adversary(backbone, x, y, tf.constant([0, 1])))(
      images, labels)
  assert calls and calls[0]["search_steps"] == 3


def test_adversarial_training_keeps_a_clean_fraction():
  config = smoke.get_config()
  config.adv.attack = "flow_pgd"
  config.adv.clean_fraction = 0.25
  images, labels, backbone = _adversarial_setup(8)
  adv = train.make_adversary(config)(backbone, images, labels,
                                     tf.constant([0, 1])).numpy()
  changed = np.abs(adv - images).reshape(8, -1).max(1) > WARP_ROUND_OFF
  np.testing.assert_array_equal(changed, [False] * 2 + [True] * 6)


def test_random_start_of_the_adversary_follows_the_step_seed():
  config = smoke.get_config()
  config.adv.attack = "flow_pgd"
  config.adv.random_start = True
  images, labels, backbone = _adversarial_setup(4)
  adversary = train.make_adversary(config)
  run = lambda *seed: adversary(backbone, images, labels,
                                tf.constant(seed)).numpy()
  np.testing.assert_array_equal(run(0, 1), run(0, 1))
  assert not np.array_equal(run(0, 1), run(0, 2))


def test_adversarial_training_composes_with_fgr():
  """FGR + AT: the step penalizes the flow gradient AT the adversarial
  inputs, so its update equals FGR trained on those inputs directly."""
  config = smoke.get_config()
  config.adv.attack = "flow_pgd"
  config.adv.steps = 3
  images, labels, backbone = _adversarial_setup(8)
  adversary = train.make_adversary(config)
  adv_images = adversary(backbone, images, labels, tf.constant([0, 1]))

  def one_step(inputs, adversary):
    model = fgr_tf.FGRModel(copy_of(backbone), fgr_lambda=50.0, rs_sigma=0.0,
                            adversary=adversary)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = model.fit(inputs, labels, batch_size=8, epochs=1, verbose=0,
                     shuffle=False).history
    return model.get_weights(), logs

  with_at, at_logs = one_step(images, adversary)
  direct, direct_logs = one_step(adv_images.numpy(), None)
  plain, _ = one_step(images, None)
  # float32 round-off of one FGR step on small_cnn: the longest sum is
  # bn0's (batch * h * w = 8 * 28 * 28 terms); 6 reducing layers (conv0,
  # bn0, conv1, bn1, fc, dense) crossed 3 times (forward, input gradient,
  # its derivative). The conv biases (1, 7) are followed by BatchNorm: zero
  # gradients but for round-off of their kernels' (0, 6) sums.
  reduction, layers = 8 * 28 * 28, 6
  assert_weights_close(with_at, direct, backbone.get_weights(), reduction,
                       3 * layers, zero_gradient={1: 0, 7: 6})
  assert any(np.abs(a - b).max() > float32_tolerance(
      np.abs(b).max(), reduction, 3 * layers) for a, b in zip(with_at, plain))
  assert at_logs["fgr_penalty"][0] > 0
  assert_close_float32(at_logs["fgr_penalty"], direct_logs["fgr_penalty"],
                       reduction, 2 * layers)  # forward and back


def test_bad_adversarial_training_settings_are_named():
  config = smoke.get_config()
  config.adv.attack = "fgsm"
  with pytest.raises(ValueError, match="Unknown adversarial-training attack"):
    train.make_adversary(config)
  config.adv.attack = "flow_pgd"
  config.adv.clean_fraction = 1.0
  with pytest.raises(ValueError, match="clean_fraction must be in"):
    train.make_adversary(config)


def test_bad_settings_are_named(tmp_path):
  config = smoke.get_config()
  config.mixed_precision = "float8"
  with pytest.raises(ValueError, match="Unknown mixed_precision 'float8'"):
    train.train_and_evaluate(config, str(tmp_path))
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="not writable"):
    train.prepare_workdir(str(blocker / "workdir"))
