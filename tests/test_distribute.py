"""tf.distribute: a step on 2 replicas equals a step on 1 device (SPEC §2)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from helpers import assert_fits_close, fit_fgr_on_one_batch, tiny_backbone
from helpers import tiny_data


@pytest.mark.parametrize("batch_norm,sync", [(False, False), (True, True)],
                         ids=["no_bn", "sync_bn"])
def test_two_replicas_equal_one_device_with_the_global_batch(batch_norm,
                                                             sync):
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  assert len(devices) >= 2, "conftest configures two logical CPUs"
  images, labels = tiny_data(n=8)
  initial = tiny_backbone(batch_norm=batch_norm).get_weights()
  single, single_logs = fit_fgr_on_one_batch(
      tf.distribute.OneDeviceStrategy(devices[0]), batch_norm, sync, images,
      labels, initial)
  strategy = fgr_tf.distribute.get_strategy("mirrored")
  assert strategy.num_replicas_in_sync == 2
  mirrored, mirrored_logs = fit_fgr_on_one_batch(strategy, batch_norm, sync,
                                             images, labels, initial)
  moved = max(np.abs(a - b).max() for a, b in zip(single, initial))
  assert moved > 1e-3
  # float32 round-off of 2 FGR steps (helpers.FIT_REDUCTION, FIT_DEPTH).
  assert_fits_close(mirrored, mirrored_logs, single, single_logs, initial,
                    batch_norm, ("loss", "ce", "fgr_penalty", "igr_penalty"))
  # A count of correct argmaxes out of 8: exact, as no top-2 logit margin
  # (>= 0.014 at both steps) is near their round-off (bound ~1e-4).
  np.testing.assert_array_equal(mirrored_logs["accuracy"],
                                single_logs["accuracy"])


def test_get_strategy_names():
  assert fgr_tf.distribute.get_strategy("default") is tf.distribute.get_strategy()
  auto = fgr_tf.distribute.get_strategy("auto")
  if len(tf.config.list_logical_devices("GPU")) < 2:
    assert auto.num_replicas_in_sync == 1
  mirrored = fgr_tf.distribute.get_strategy("mirrored")
  assert isinstance(mirrored, tf.distribute.MirroredStrategy)
  if not tf.config.list_logical_devices("GPU"):
    assert mirrored.num_replicas_in_sync == len(
        tf.config.list_logical_devices("CPU"))
  with pytest.raises(ValueError, match="Unknown strategy 'horovod'"):
    fgr_tf.distribute.get_strategy("horovod")
