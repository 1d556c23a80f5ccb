"""fgr_tf.train helpers: schedule, adversarial training hook, validation."""

import numpy as np
import pytest

import fgr_tf
from fgr_tf import synthetic
from fgr_tf import train
from configs import smoke


def test_learning_rate_schedule_steps_down_at_the_configured_epochs():
  config = smoke.get_config()
  config.train.learning_rate = 0.1
  config.train.lr_decay_epochs = (2, 3)
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  lrs = [float(schedule(step)) for step in (0, 19, 21, 29, 31)]
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_adversarial_training_attack_from_config():
  config = smoke.get_config()
  assert train.make_adversary(config) is None
  config.adv.attack = "flow_pgd"
  config.adv.epsilon = 0.02
  config.adv.steps = 2
  adversary = train.make_adversary(config)
  images, labels = synthetic.shapes(4, seed=0)
  backbone = fgr_tf.models.build("small_cnn", 10, (28, 28, 1))
  adv = adversary(backbone, images, labels).numpy()
  assert adv.shape == images.shape and not np.allclose(adv, images)
  config.adv.attack = "fgsm"
  with pytest.raises(ValueError, match="Unknown adversarial-training attack"):
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
