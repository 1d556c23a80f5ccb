"""How exact is each execution path? The table in the README.

  python -m bench.exactness --output=runs/exactness.jsonl            # all
  python -m bench.exactness --backbones=small_cnn --paths=graph,xla  # some
  python -m bench.exactness --summary --output=runs/exactness.jsonl  # table

For each backbone x path x input family x batch size: the worst relative
error (per weight tensor, error / max |reference|) of the float32
parameter gradients of `ce + 300 * FGR` against a float64 run of the same
backbone and weights on the same ReLU / max-pool branches
(`fgr_tf.exactness`), plus the error against float64's own branches and
the number of units that flipped. Paths: graph (tf.function), xla
(jit_compile=True, what GPUs run), mirrored (2 logical CPUs,
synchronized BatchNorm), native_conv (no matmul convolutions), keras_bn
(the unfused BatchNorm), mask_pool_gradient (the max-pool first derivative
GPUs take), igr (IGR, lambda 5, under XLA), and the mixed
precision policies under graph and XLA (mixed_bfloat16 / mixed_float16:
error against float64 on float64's branches; their error is the
precision's, documented, not a bug). One JSON line per case, appended, so
a run resumes where it stopped.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import fgr_tf
from fgr_tf import exactness
from fgr_tf.backbones import batch_norm
from fgr_tf.backbones import gemm_conv
from fgr_tf.backbones import pooling

PATHS = ("graph", "xla", "mirrored", "native_conv", "keras_bn",
         "mask_pool_gradient", "igr", "mixed_bfloat16", "mixed_bfloat16_xla",
         "mixed_float16", "mixed_float16_xla")
SHAPES = {"small_cnn": (28, 28, 1)}
FASHION_MNIST = os.path.join(os.path.dirname(__file__), os.pardir, "tests",
                             "data", "fashion_mnist_test128.npz")


class _Patched:
  """Applies a path's class-level switches, restores them on exit."""

  def __init__(self, path):
    self.path = path
    self.saved = []

  def _set(self, owner, name, value):
    self.saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)

  def __enter__(self):
    if self.path == "native_conv":
      self._set(gemm_conv.Conv2D, "GEMM_MAX_PIXELS", 0)
    if self.path == "keras_bn":
      self._set(batch_norm.BatchNormalization, "_fast_path",
                lambda *args: False)
    if self.path == "mask_pool_gradient":
      self._set(pooling, "_native_first_derivative", lambda: False)
    if self.path.startswith("mixed_"):
      keras.mixed_precision.set_global_policy(
          self.path.replace("_xla", ""))
    return self

  def __exit__(self, *args):
    for owner, name, value in reversed(self.saved):
      setattr(owner, name, value)
    keras.mixed_precision.set_global_policy("float32")


def run_case(name, path, family, weights, batch, seed=0):
  """One case -> dict (see the module docstring)."""
  shape = SHAPES.get(name, (32, 32, 3))
  with np.load(FASHION_MNIST) as data:
    fashion = data["images"]
  images, labels = exactness.case_images(family, batch, shape, seed, fashion)
  mirrored = path.startswith("mirrored")
  strategy = fgr_tf.distribute.get_strategy("mirrored") if mirrored else None
  mixed = path.startswith("mixed_")
  lambdas = (0.0, 5.0) if path == "igr" else (300.0, 0.0)
  start = time.time()
  with _Patched(path):
    keras.utils.set_random_seed(seed)
    scope = strategy.scope() if strategy else _Null()
    with scope:
      backbone = fgr_tf.backbones.build(name, 10, shape, sync_batchnorm=mirrored)
    gradients = exactness.make_path(
        backbone, jit_compile=path.endswith("xla") or path == "igr",
        strategy=strategy)
    if weights == "trained":
      exactness.briefly_train(backbone, gradients, images, labels)
    if mixed:  # compare with float64 on its own branches (no replay)
      result = _mixed_precision_error(backbone, gradients, images, labels)
    else:
      result = exactness.compare(backbone, gradients, images, labels,
                                 *lambdas)
  result.update(backbone=name, path=path, family=family, weights=weights,
                batch=batch, seconds=round(time.time() - start, 1))
  return result


def _mixed_precision_error(backbone, gradients, images, labels):
  grads, _ = gradients(images, labels)
  twin = exactness.float64_twin(backbone, replay_branches=False)
  reference, _, _ = exactness.reference_gradients(twin, images, labels)
  names = [w.path for w in backbone.trainable_weights]
  errors, _ = exactness.relative_errors(grads, reference, names)
  worst = max(errors, key=errors.get)
  flat = np.concatenate([g.ravel() for g in grads])
  flat_ref = np.concatenate([r.ravel() for r in reference])
  cosine = float(flat @ flat_ref / np.linalg.norm(flat) /
                 np.linalg.norm(flat_ref))
  return {"error": errors[worst], "tensor": worst, "cosine": cosine,
          "l2_error": float(np.linalg.norm(flat - flat_ref) /
                            np.linalg.norm(flat_ref))}


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *args):
    return False


def default_cases():
  """The README's table: every backbone on every exact path with both
  input families (batch 16), batch 8..128 on graph and XLA (small_cnn,
  vgg11, resnet18), and mixed precision on small_cnn and vgg11."""
  cases = []
  for name in fgr_tf.backbones.NAMES:
    for path in PATHS[:7]:
      for family, weights in (("uniform", "fresh"),
                              ("fashion_mnist", "trained")):
        cases.append((name, path, family, weights, 16))
    if name in ("small_cnn", "vgg11", "resnet18"):  # (vgg13-19: vgg11's
      for path in ("graph", "xla"):                   # layers, deeper)
        for batch in (8, 32, 128):
          cases.append((name, path, "fashion_mnist", "trained", batch))
  for name in ("small_cnn", "vgg11"):
    for path in PATHS[7:]:
      cases.append((name, path, "fashion_mnist", "trained", 16))
  return cases


def _key(case):
  return "/".join(str(v) for v in case)


def summary(lines):
  """Markdown. Exact paths: per backbone and path, over inputs and
  batches, the worst error / the worst zero_error (tensors whose exact
  gradient is zero) and the number of cases. Mixed precision (a second
  table): the worst L2 error of the whole parameter gradient and the
  lowest cosine to float64's."""
  cases = {}
  for r in lines:
    cases.setdefault((r["backbone"], r["path"]), []).append(r)

  def table(paths, cell):
    paths = [p for p in paths if any(k[1] == p for k in cases)]
    names = [n for n in fgr_tf.backbones.NAMES
             if any(k[0] == n and k[1] in paths for k in cases)]
    out = ["| backbone | " + " | ".join(paths) + " |",
           "|---|" + "---|" * len(paths)]
    for name in names:
      cells = [cell(cases[(name, p)]) if (name, p) in cases else ""
               for p in paths]
      out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) if names else ""

  exact = table(
      [p for p in PATHS if not p.startswith("mixed_")],
      lambda rs: (f"{max(r['error'] for r in rs):.1e} / "
                  f"{max(r.get('zero_error', 0.0) for r in rs):.1e} "
                  f"({len(rs)})"))
  mixed = table(
      [p for p in PATHS if p.startswith("mixed_")],
      lambda rs: (f"{max(r['l2_error'] for r in rs):.3f} / "
                  f"{min(r['cosine'] for r in rs):.4f}"))
  return exact + ("\n\n" + mixed if mixed else "")


def main(argv):
  del argv
  # Two logical CPUs for the mirrored paths (before TF starts its devices).
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices("CPU")[0],
      [tf.config.LogicalDeviceConfiguration()] * 2)
  f = flags.FLAGS
  done = {}
  if os.path.exists(f.output):
    with open(f.output) as lines:
      for line in lines:
        r = json.loads(line)
        done[_key((r["backbone"], r["path"], r["family"], r["weights"],
                   r["batch"]))] = r
  if f.summary:
    print(summary(done.values()))
    return
  os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
  if f.case:  # one case, in this process
    name, path, family, weights, batch = f.case.split("/")
    result = run_case(name, path, family, weights, int(batch))
    print(json.dumps(result), flush=True)
    with open(f.output, "a") as out:
      out.write(json.dumps(result) + "\n")
    return
  for case in default_cases():
    if (f.backbones and case[0] not in f.backbones) or (
        f.paths and case[1] not in f.paths) or _key(case) in done:
      continue
    # A process per case: TF keeps memory of earlier graphs (18 GB after
    # ~40 float64 second-order cases in one process).
    subprocess.run([sys.executable, "-m", "bench.exactness",
                    f"--output={f.output}", f"--case={_key(case)}"],
                   check=True)


if __name__ == "__main__":
  flags.DEFINE_string("output", "runs/exactness.jsonl", "JSON lines file.")
  flags.DEFINE_list("backbones", [], "Subset of backbones (default all).")
  flags.DEFINE_list("paths", [], f"Subset of {PATHS}.")
  flags.DEFINE_bool("summary", False, "Print the table of --output only.")
  flags.DEFINE_string("case", "", "Run one case, name/path/family/weights/"
                      "batch (used by the driver).")
  app.run(main)
