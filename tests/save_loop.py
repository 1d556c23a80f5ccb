"""Saves two alternating weight sets forever (killed by test_faults.py).

  python save_loop.py WORKDIR

Writes WORKDIR/best.keras with `save_atomically` and WORKDIR/backup with
`NaNSafeBackupAndRestore`, alternating between weights A (seed 0) and B
(seed 1); prints "ready" once both files exist.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import fgr_tf  # noqa: E402
from fgr_tf.experiment import checkpoints  # noqa: E402


def build(seed):
  keras.utils.set_random_seed(seed)
  backbone = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))
  model = fgr_tf.FGRModel(backbone, fgr_lambda=1.0)
  model.compile(optimizer=keras.optimizers.SGD(0.01))
  return model


def main(workdir):
  model = build(0)
  weights = [model.get_weights(), build(1).get_weights()]
  backup = checkpoints.NaNSafeBackupAndRestore(
      os.path.join(workdir, "backup"), double_checkpoint=True)
  backup.set_model(model)
  for i in range(10**6):
    model.set_weights(weights[i % 2])
    checkpoints.save_atomically(model, os.path.join(workdir, "best.keras"))
    backup.on_epoch_end(i, {"loss": 1.0})
    if i == 1:
      print("ready", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
