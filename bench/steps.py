"""Training-step throughput: plain, FGR, IGR, adversarial-training steps,
attacks, eval forward.

  python -m bench.steps --model vgg11 --batch 128 --image_size 32

prints images/s (median and best over --repeats timed steps, after --warmup
steps) for each mode, and the FGR/plain time ratio from the same run.
Modes: plain, fgr (lambda 300, random start 0.01), igr, at (flow-PGD
adversarial training, 10 steps), fgr_at (both), flow_pgd (the attack, 10
steps, per image attacked: the adversarial images, as the original's
`multi_step` returns them), flow_pgd_result (the same with the attack's
whole result: the adversarial images classified too), eval (inference
forward, BatchNorms folded: `fgr_tf.backbones.inference_function`), and
fit_plain / fit_fgr (`model.fit` over the CIFAR input pipeline of
`fgr_tf.data`, with augmentation: includes data loading and callbacks;
one epoch of --repeats steps after a warm-up epoch). The JSON output
(--json) also holds the process's RSS before the first mode and its peak
(MiB): run one mode per process to compare the memory of modes.
`--smoke` runs a tiny configuration (CI checks that the bench runs, never
its speed).
"""

import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fgr_tf  # noqa: E402
from bench.memory import rss_mb  # noqa: E402

_MODEL = flags.DEFINE_string("model", "vgg11", "Backbone name.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Number of classes.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per mode.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per mode.")
_MODES = flags.DEFINE_list("modes", ["plain", "fgr", "igr", "eval"],
                           "Which steps to time (see the module docstring).")
_JIT = flags.DEFINE_bool("jit_compile", False, "Compile steps with XLA.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
    "Layer dtype policy of the backbone (the penalties stay float32).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes, for CI.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line instead.")


def _flow_pgd10_result(backbone, images, labels, seed=0):
  return fgr_tf.attacks.flow_pgd(backbone, images, labels, epsilon=0.01,
                                 steps=10, seed=seed)


def _flow_pgd10(backbone, images, labels, seed=0):
  return _flow_pgd10_result(backbone, images, labels, seed).adv_images


MODES = {
    "plain": dict(fgr_lambda=0.0, rs_sigma=0.0),
    "fgr": dict(fgr_lambda=300.0, rs_sigma=0.01),
    "igr": dict(igr_lambda=10.0),
    "at": dict(fgr_lambda=0.0, rs_sigma=0.0, adversary=_flow_pgd10),
    "fgr_at": dict(fgr_lambda=300.0, rs_sigma=0.01, adversary=_flow_pgd10),
}
OTHER_MODES = ("eval", "flow_pgd", "flow_pgd_result", "fit_plain",
               "fit_fgr")


def time_fit(mode, backbone, batch, repeats, warmup):
  """Seconds per step of model.fit on the augmented CIFAR pipeline."""
  rng = np.random.default_rng(0)
  n = batch * repeats
  shape = (n,) + tuple(backbone.input_shape[1:])
  images = rng.integers(0, 256, size=shape, dtype=np.uint8)
  labels = rng.integers(0, backbone.output_shape[-1], size=n)
  dataset = fgr_tf.data.make_dataset(images, labels, batch, train=True,
                                     dataset_name="cifar10")
  model = fgr_tf.FGRModel(backbone, **MODES[mode.split("_", 1)[1]])
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                metrics=["accuracy"])
  model.fit(dataset, epochs=1, steps_per_epoch=max(warmup, 1), verbose=0)
  start = time.perf_counter()
  model.fit(dataset, epochs=1, verbose=0)
  return [(time.perf_counter() - start) / repeats]


def make_step(mode, backbone, images, labels, jit_compile):
  """A no-argument callable that runs one step of `mode` to completion."""
  if mode == "eval":
    # The library's inference path (evaluation, attacks, FGRModel.predict,
    # export): BatchNorms folded into their convolutions.
    forward = tf.function(fgr_tf.backbones.inference_function(backbone),
                          jit_compile=jit_compile)
    step = lambda: forward(images).numpy()
  elif mode == "flow_pgd":
    # The adversarial images, as adversarial training's adversary makes
    # them and as the original's `multi_step` returns them: inside a
    # tf.function the result's unused outputs (the classification of the
    # adversarial images: one more forward pass) are pruned.
    adversary = tf.function(lambda x, y: _flow_pgd10(backbone, x, y))
    step = lambda: adversary(images, labels).numpy()
  elif mode == "flow_pgd_result":
    # The whole `AttackResult` (what evaluation uses): the adversarial
    # images classified too.
    step = lambda: _flow_pgd10_result(backbone, images,
                                      labels).adv_logits.numpy()
  else:
    model = fgr_tf.FGRModel(backbone, **MODES[mode])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  jit_compile=jit_compile)
    step = lambda: model.train_on_batch(images, labels)
  return step


def time_mode(mode, backbone, images, labels, warmup, repeats, jit_compile):
  """Returns the list of seconds per timed step."""
  step = make_step(mode, backbone, images, labels, jit_compile)
  for _ in range(warmup):
    step()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  return seconds


def synthetic_batch(batch, size, channels, classes):
  """Seeded uniform images [batch, size, size, channels] and int32 labels."""
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(batch, size, size, channels)).astype(np.float32)
  labels = rng.integers(0, classes, size=batch).astype(np.int32)
  return images, labels


def run(model_name, batch, size, channels, classes, warmup, repeats, modes,
        jit_compile=False, dtype="float32"):
  """Times each mode; returns {mode: {"median": img/s, "best": img/s}}."""
  unknown = set(modes) - set(MODES) - set(OTHER_MODES)
  if unknown:
    raise ValueError(f"Unknown modes {sorted(unknown)}. Expected a subset of "
                     f"{sorted(MODES) + list(OTHER_MODES)}.")
  images, labels = synthetic_batch(batch, size, channels, classes)
  results = {}
  for mode in modes:
    keras.utils.set_random_seed(0)
    backbone = fgr_tf.backbones.build(model_name, classes,
                                   (size, size, channels), dtype=dtype)
    if mode.startswith("fit_"):
      seconds = time_fit(mode, backbone, batch, repeats, warmup)
    else:
      seconds = time_mode(mode, backbone, images, labels, warmup, repeats,
                          jit_compile)
    results[mode] = {"median": batch / statistics.median(seconds),
                     "best": batch / min(seconds)}
  return results


def format_results(results, header):
  lines = [header, f"{'step':<16}{'median img/s':>14}{'best img/s':>12}"]
  for mode, r in results.items():
    lines.append(f"{mode:<16}{r['median']:>14.1f}{r['best']:>12.1f}")
  if "plain" in results and "fgr" in results:
    ratio = results["plain"]["median"] / results["fgr"]["median"]
    lines.append(f"FGR step time / plain step time (medians): {ratio:.2f}")
  return "\n".join(lines)


def main(argv):
  del argv
  if _SMOKE.value:
    config = dict(model_name="small_cnn", batch=8, size=8, channels=1,
                  classes=3, warmup=1, repeats=2)
  else:
    config = dict(model_name=_MODEL.value, batch=_BATCH.value,
                  size=_SIZE.value, channels=_CHANNELS.value,
                  classes=_CLASSES.value, warmup=_WARMUP.value,
                  repeats=_REPEATS.value)
  rss_before = rss_mb()[0]
  results = run(modes=_MODES.value, jit_compile=_JIT.value,
                dtype=_DTYPE.value, **config)
  header = (f"{config['model_name']} batch {config['batch']} "
            f"{config['size']}x{config['size']}x{config['channels']} "
            f"{_DTYPE.value}, "
            f"TF {tf.__version__}, devices "
            f"{[d.device_type for d in tf.config.list_logical_devices()]}")
  if _JSON.value:
    print(json.dumps({"header": header, "results": results,
                      "rss_before_mb": rss_before,
                      "peak_rss_mb": rss_mb()[1]}))
  else:
    print(format_results(results, header))


if __name__ == "__main__":
  app.run(main)
