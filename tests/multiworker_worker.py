"""One worker of tests/test_multiworker.py (run as a subprocess).

  TF_CONFIG=... python multiworker_worker.py OUT.npz

Trains the tiny FGR model of test_distribute for 2 steps on the global batch
under MultiWorkerMirroredStrategy and saves the backbone's weights and logs.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fgr_tf  # noqa: E402
keras.config.disable_traceback_filtering()
from helpers import tiny_backbone, tiny_data  # noqa: E402

SETTINGS = dict(fgr_lambda=300.0, rs_sigma=0.0, igr_lambda=5.0)


def train_two_steps(strategy, images, labels, initial_weights):
  """Backbone weights and logs after 2 steps on the full batch."""
  with strategy.scope():
    backbone = tiny_backbone(batch_norm=True, sync_batchnorm=True)
    backbone.set_weights(initial_weights)
    model = fgr_tf.FGRModel(backbone, **SETTINGS)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  metrics=["accuracy"])
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
      len(images))
  logs = model.fit(dataset, epochs=2, shuffle=False, verbose=0).history
  return model.backbone.get_weights(), logs


def main(out):
  strategy = fgr_tf.distribute.get_strategy("multi_worker")
  images, labels = tiny_data(n=8)
  initial = tiny_backbone(batch_norm=True).get_weights()
  weights, logs = train_two_steps(strategy, images, labels, initial)
  np.savez(out, replicas=strategy.num_replicas_in_sync,
           loss=np.array(logs["loss"]), fgr_penalty=np.array(
               logs["fgr_penalty"]),
           **{f"w{i}": w for i, w in enumerate(weights)})


if __name__ == "__main__":
  main(sys.argv[1])
