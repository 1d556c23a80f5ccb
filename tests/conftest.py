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


def _onednn_cap_hides_bfloat16():
  """True when ONEDNN_MAX_CPU_ISA caps oneDNN below the CPU's bfloat16
  instructions (an AVX-512-BF16 or AMX CPU standing in for an AVX2 one):
  TensorFlow still sends bfloat16 ops to oneDNN, which cannot make them
  under the cap and aborts the process. A real AVX2 CPU runs them (by
  Eigen)."""
  cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
  if not cap or cap == "ALL" or "BF16" in cap or "AMX" in cap:
    return False
  try:
    cpu_flags = pathlib.Path("/proc/cpuinfo").read_text().split()
  except OSError:
    return False
  return "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
  if _onednn_cap_hides_bfloat16():
    skip = pytest.mark.skip(reason=(
        "ONEDNN_MAX_CPU_ISA hides this CPU's bfloat16 from oneDNN, which "
        "aborts on TensorFlow's bfloat16 ops (emulation only)"))
    for item in items:
      if "bfloat16_kernels" in item.keywords:
        item.add_marker(skip)
