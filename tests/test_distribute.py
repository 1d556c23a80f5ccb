"""tf.distribute: a step on 2 replicas equals a step on 1 device (SPEC §2)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from helpers import fit_fgr_on_one_batch, tiny_backbone, tiny_data


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
  for a, b in zip(mirrored, single):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for key in ("loss", "ce", "fgr_penalty", "igr_penalty", "accuracy"):
    np.testing.assert_allclose(mirrored_logs[key], single_logs[key],
                               rtol=1e-4, err_msg=key)


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
