"""Shared test setup: quiet TF, two logical CPUs for tf.distribute tests."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so MirroredStrategy tests run on one CPU. Must
# happen before TensorFlow initializes its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir():
  return DATA


def load_npz(name):
  with np.load(DATA / name) as f:
    return {k: f[k] for k in f.files}


# The longest test modules, longest first (seconds of test time measured with
# `pytest --durations=0` on 2 cores). `make test` distributes whole modules
# (`--dist loadscope`) in collection order: starting with the long ones
# keeps a long module from running alone at the end while the other worker
# idles. Modules not listed keep their order, after these.
_LONGEST_FIRST = ("test_bench", "test_attacks", "test_exactness",
                  "test_workflow", "test_sweep", "test_attacks_xla",
                  "test_folding", "test_determinism", "test_apps",
                  "test_faults", "test_gemm_conv", "test_model")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
