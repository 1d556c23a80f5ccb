"""fgr_tf vs the PyTorch original on this machine, interleaved runs.

  python -m bench.compare --torch_python=/path/to/venv-with-torch/bin/python

Alternates `bench.steps` (this library) and `bench/torch_original.py` (the
original's code paths in PyTorch) for --rounds rounds, so both see the same
machine load, and prints images/s (median over rounds of each run's median
step) and the speed ratio per mode: VGG-11, 32x32x3, 10 classes.
The flow_pgd row times the same work on both sides, the 10-step attack's
adversarial images (the original's `multi_step` returns them alone); a
last line times fgr_tf's whole `AttackResult` (the images classified too,
one more forward pass) against the same baseline.
With --original_dir (a checkout of xpf/Flow-Gradient-Regularization) the
original's own classes are timed too, and each ratio is against the faster
of the restatement and the original's code.

Each round also measures `bench.flop_bound` (images/s if the mode's
direct-convolution FLOPs ran at this machine's sustained matmul rate); the
table's "bound" column and each side's share of it say how much speed-up
over the original the machine allows at all.
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
_ORIGINAL_DIR = flags.DEFINE_string(
    "original_dir", "", "A checkout of xpf/Flow-Gradient-Regularization: "
    "also time its own VGG, FGR training step and multi_step attack.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"],
    "float32, or bfloat16: fgr_tf's mixed_bfloat16 policy against the "
    "original under torch.autocast(bfloat16).")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("plain", "fgr", "flow_pgd", "eval")
# fgr_tf only: the flow attack's whole result (the adversarial images
# classified too), against the original's flow_pgd (images only).
RESULT_MODE = "flow_pgd_result"


def _last_json_line(text):
  return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def _run_bench_module(module, *args):
  """The last JSON line printed by `python -m bench.<module> *args`, run
  from the repository root in a fresh process."""
  out = subprocess.run(
      [sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT,
      check=True, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
  return _last_json_line(out)


def run_tf(batch, repeats, dtype="float32"):
  policy = "mixed_bfloat16" if dtype == "bfloat16" else dtype
  result = _run_bench_module(
      "steps", "--model=vgg11", f"--batch={batch}", f"--repeats={repeats}",
      "--json", f"--dtype={policy}",
      f"--modes={','.join(MODES + (RESULT_MODE,))}")
  return {m: r["median"] for m, r in result["results"].items()}


def run_bound():
  """{mode: images/s at the FLOP bound} (`bench.flop_bound`)."""
  return _run_bench_module("flop_bound", "--json")["images_per_s"]


def run_torch(python, batch, repeats, threads, dtype="float32",
              original_dir=""):
  """{"restated": {mode: images/s}} and, with `original_dir`,
  {"original": {mode: images/s}} (the original's own code)."""
  out = subprocess.run(
      [python, str(ROOT / "bench" / "torch_original.py"), f"--batch={batch}",
       f"--repeats={repeats}", f"--threads={threads}", f"--dtype={dtype}",
       f"--modes={','.join(MODES)}", f"--original_dir={original_dir}"],
      check=True, capture_output=True, text=True).stdout
  result = _last_json_line(out)
  runs = {"restated": result["images_per_s"]}
  if "original_images_per_s" in result:
    runs["original"] = result["original_images_per_s"]
  return runs


def main(argv):
  del argv
  ours, theirs, bounds = [], [], []
  for _ in range(_ROUNDS.value):
    bounds.append(run_bound())
    ours.append(run_tf(_BATCH.value, _REPEATS.value, _DTYPE.value))
    theirs.append(run_torch(_TORCH_PYTHON.value, _BATCH.value,
                            _REPEATS.value, _THREADS.value, _DTYPE.value,
                            _ORIGINAL_DIR.value))
  kinds = list(theirs[0])
  print(f"VGG-11 batch {_BATCH.value} 32x32x3 {_DTYPE.value}, images/s "
        f"(median of {_ROUNDS.value} interleaved rounds); ratio = fgr_tf / "
        f"the faster of {' and '.join(kinds)}; bound = the FLOP bound "
        "(bench.flop_bound), max ratio = bound / that faster one")
  print(f"{'mode':<10}{'fgr_tf':>10}" + "".join(f"{k:>10}" for k in kinds)
        + f"{'ratio':>8}{'bound':>10}{'max ratio':>10}")
  for mode in MODES:
    a = statistics.median(r[mode] for r in ours)
    others = [statistics.median(r[k][mode] for r in theirs) for k in kinds]
    bound = statistics.median(r[mode] for r in bounds)
    print(f"{mode:<10}{a:>10.1f}" + "".join(f"{b:>10.1f}" for b in others)
          + f"{a / max(others):>8.2f}{bound:>10.1f}"
          f"{bound / max(others):>10.2f}")
  a = statistics.median(r[RESULT_MODE] for r in ours)
  others = [statistics.median(r[k]["flow_pgd"] for r in theirs)
            for k in kinds]
  print(f"{RESULT_MODE} (fgr_tf's flow_pgd with its whole result: the "
        f"adversarial images classified too): {a:.1f} img/s, "
        f"{a / max(others):.2f}x the original's flow_pgd")
  a = statistics.median(r["plain"] / r["fgr"] for r in ours)
  print(f"fgr_tf FGR step time / plain step time: {a:.2f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["torch_python"])
  app.run(main)
