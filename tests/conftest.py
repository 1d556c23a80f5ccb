"""Shared test setup: quiet TF, two logical CPUs for tf.distribute tests,
bfloat16 kernel tests skipped (with the reason) where an ISA cap makes
oneDNN abort on them."""

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


def _onednn_cap_hides_bfloat16():
  """True when ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) caps oneDNN at an
  ISA without bfloat16 on a CPU for which TensorFlow sends bfloat16 ops to
  oneDNN (AVX-512 or AVX-NE-CONVERT: an AVX-512 CPU standing in for an
  AVX2 one): oneDNN cannot make them under the cap and aborts the
  process. A real AVX2 CPU runs them (by Eigen)."""
  cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or
         os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
  try:
    cpu_flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
  except OSError:
    return False
  without_bfloat16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI"}
  if "avx_ne_convert" not in cpu_flags:
    without_bfloat16.add("AVX2_VNNI_2")
  return cap in without_bfloat16 and bool(
      {"avx512f", "avx_ne_convert"} & cpu_flags)


def pytest_collection_modifyitems(items):
  if _onednn_cap_hides_bfloat16():
    skip = pytest.mark.skip(reason=(
        "ONEDNN_MAX_CPU_ISA hides this CPU's bfloat16 from oneDNN, which "
        "aborts on TensorFlow's bfloat16 ops (emulation only)"))
    for item in items:
      if "bfloat16_kernels" in item.keywords:
        item.add_marker(skip)
