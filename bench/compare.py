"""fgr_tf vs the PyTorch original on this machine, interleaved runs.

  python -m bench.compare --torch_python=/path/to/venv-with-torch/bin/python

Alternates `bench.steps` (this library) and `bench/torch_original.py` (the
original's code paths in PyTorch) for --rounds rounds, so both see the same
machine load, and prints images/s (median over rounds of each run's median
step) and the speed ratio per mode: VGG-11, 32x32x3, 10 classes.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

from absl import app
from absl import flags

_TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with "
                                    "torch installed.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating rounds.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 8, "Timed steps per mode.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"],
    "float32, or bfloat16: fgr_tf's mixed_bfloat16 policy against the "
    "original under torch.autocast(bfloat16).")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("plain", "fgr", "flow_pgd", "eval")


def _last_json_line(text):
  return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def run_tf(batch, repeats, dtype="float32"):
  policy = "mixed_bfloat16" if dtype == "bfloat16" else dtype
  out = subprocess.run(
      [sys.executable, "-m", "bench.steps", "--model=vgg11",
       f"--batch={batch}", f"--repeats={repeats}", "--json",
       f"--dtype={policy}",
       f"--modes={','.join(MODES)}"], cwd=ROOT, check=True,
      capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
  return {m: r["median"] for m, r in _last_json_line(out)["results"].items()}


def run_torch(python, batch, repeats, threads, dtype="float32"):
  out = subprocess.run(
      [python, str(ROOT / "bench" / "torch_original.py"), f"--batch={batch}",
       f"--repeats={repeats}", f"--threads={threads}", f"--dtype={dtype}",
       f"--modes={','.join(MODES)}"], check=True, capture_output=True,
      text=True).stdout
  return _last_json_line(out)["images_per_s"]


def main(argv):
  del argv
  ours, theirs = [], []
  for _ in range(_ROUNDS.value):
    ours.append(run_tf(_BATCH.value, _REPEATS.value, _DTYPE.value))
    theirs.append(run_torch(_TORCH_PYTHON.value, _BATCH.value,
                            _REPEATS.value, _THREADS.value, _DTYPE.value))
  print(f"VGG-11 batch {_BATCH.value} 32x32x3 {_DTYPE.value}, images/s "
        f"(median of "
        f"{_ROUNDS.value} interleaved rounds)")
  print(f"{'mode':<10}{'fgr_tf':>10}{'original':>10}{'ratio':>8}")
  for mode in MODES:
    a = statistics.median(r[mode] for r in ours)
    b = statistics.median(r[mode] for r in theirs)
    print(f"{mode:<10}{a:>10.1f}{b:>10.1f}{a / b:>8.2f}")
  a = statistics.median(r["plain"] / r["fgr"] for r in ours)
  print(f"fgr_tf FGR step time / plain step time: {a:.2f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["torch_python"])
  app.run(main)
