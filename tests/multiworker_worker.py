"""One worker of tests/test_multiworker.py (run as a subprocess).

  TF_CONFIG=... python multiworker_worker.py OUT.npz

Trains the tiny FGR model of test_distribute (synchronized BatchNorm) for
2 steps on the global batch under MultiWorkerMirroredStrategy and saves the
backbone's weights and logs.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import fgr_tf  # noqa: E402
from helpers import fit_fgr_on_one_batch  # noqa: E402
from helpers import tiny_backbone  # noqa: E402
from helpers import tiny_data  # noqa: E402


def main(out):
  strategy = fgr_tf.distribute.get_strategy("multi_worker")
  images, labels = tiny_data(n=8)
  initial = tiny_backbone(batch_norm=True).get_weights()
  weights, logs = fit_fgr_on_one_batch(strategy, True, True, images, labels,
                                       initial)
  np.savez(out, replicas=strategy.num_replicas_in_sync,
           loss=np.array(logs["loss"]), fgr_penalty=np.array(
               logs["fgr_penalty"]),
           **{f"w{i}": w for i, w in enumerate(weights)})


if __name__ == "__main__":
  main(sys.argv[1])
