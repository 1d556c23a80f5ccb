"""Attack speed: seconds per image and the ratio to a FLOP bound.

  python -m bench.attacks                       # small CNN and VGG-11
  python -m bench.attacks --models=small_cnn --attacks=adef,worst_of_k
  ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.attacks   # AVX2-only kernels

For each model (the small CNN at 28x28x1, batch 250, the quickstart's
evaluation; VGG-11 at 32x32x3, batch 128) and attack, runs the attack on 4
and 8 images untimed (tracing), then --timed_calls timed calls on the
batch, and prints the median seconds per image, the FLOP bound and
their ratio, and what the attack found (success rate, mean iterations,
mean T-norm: a faster attack must find the same).

The FLOP bound is the time the attack's necessary multiply-adds take at
the machine's sustained matmul rate, measured in the same run (a
2048x2048 float32 `tf.matmul`, median of 20). F = the forward FLOPs of
one image, counted from the model's layers: 2 * H_out * W_out * C_out *
k_h * k_w * C_in per Conv2D and 2 * inputs * outputs per Dense
(BatchNorm, ReLU, pooling, the warp: not counted). A gradient w.r.t. the
input costs a forward and a backward pass, 2F (the backward pass through a
conv or dense layer w.r.t. its input takes as many FLOPs as its forward).
Per image:
  flow_pgd     steps * 2F
  stadv        rounds the image needs (1 + the rounds after its failures,
               from `iterations`) * steps * 2F
  adef         iterations * (1 + k) F: a forward and the k candidates'
               backward passes (the next forward doubles as the check)
  worst_of_k   transforms tried until the first fooling one (iterations) * F
so the bound counts only the work that the attack's result needs: what
an attack spends on finished images shows in the ratio.

The models are trained briefly and cached in --cache_dir (the same weights
for every run that shares the directory, e.g. before and after a change):
the small CNN on Fashion-MNIST (Debian's dataset-fashion-mnist) when
present, else on `fgr_tf.synthetic`; VGG-11 on 3-channel synthetic shapes.
The attacked images are the first test images. VGG-11 runs fewer steps by
default (--vgg_steps_scale; the bound scales with them).
`--save=path.npz` writes every attack's per-image success, iterations,
t_norm and flow, to compare two runs (`--compare=a.npz,b.npz`).
`--profile` prints the op types that took the most time per attack
(`bench.profile_ops`). `--paired_switch=<bench.switches switch>` times
each attack with the switch on against off instead, alternating
`--paired_rounds` rounds in one process (e.g. `--models=small_cnn
--attacks=adef --paired_switch=adef_first_block`).
"""

import json
import os
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fgr_tf  # noqa: E402
from fgr_tf import synthetic  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["small_cnn", "vgg11"],
                            "small_cnn (28x28x1) and/or vgg11 (32x32x3).")
_ATTACKS = flags.DEFINE_list(
    "attacks", ["flow_pgd", "stadv", "adef", "worst_of_k"], "Attacks.")
_REPEATS = flags.DEFINE_integer("timed_calls", 1, "Timed calls per attack.")
_CACHE = flags.DEFINE_string("cache_dir", "/tmp/fgr_bench_attacks",
                             "Where the trained models are kept.")
_VGG_SCALE = flags.DEFINE_float(
    "vgg_steps_scale", 0.2, "VGG-11: flow-PGD and stAdv steps times this "
    "(ADef and the grid as for the small CNN).")
_SAVE = flags.DEFINE_string("save", "", "Write per-image results (.npz).")
_COMPARE = flags.DEFINE_list("compare", [], "Compare two --save files "
                             "instead of running.")
_PROFILE = flags.DEFINE_bool("profile", False, "Print the top op types.")
_JIT = flags.DEFINE_bool("xla", False, "Run the attacks with XLA.")
_JSON = flags.DEFINE_string("json_out", "",
                            "Append JSON lines of the results.")
_PAIRED_SWITCH = flags.DEFINE_string(
    "paired_switch", "",
    "Instead of the table: each attack with this bench.switches switch on "
    "against off, alternating in one process (`time_paired`).")
_PAIRED_ROUNDS = flags.DEFINE_integer("paired_rounds", 12,
                                      "Rounds of --paired_switch.")

MODELS = {
    "small_cnn": dict(shape=(28, 28, 1), batch=250),
    "vgg11": dict(shape=(32, 32, 3), batch=128),
}

# The quickstart's evaluation settings (fgr_tf/experiment/configs).
SETTINGS = {
    "flow_pgd": dict(epsilon=0.01, steps=100),
    "stadv": dict(tau=0.05, steps=200, search_steps=3),
    "adef": dict(sigma=0.5, max_iter=100, overshoot=1.1),
    "worst_of_k": dict(max_angle=30.0, max_shift=0.1, grid=True),
}


def cpu_model_name():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  except OSError:
    return "unknown"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def matmul_gflops(n=2048, repeats=20):
  """Sustained float32 matmul rate (GFLOP/s, median of `repeats`)."""
  a = tf.random.stateless_uniform([n, n], [1, 2])
  b = tf.random.stateless_uniform([n, n], [3, 4])
  matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
  matmul(a, b).numpy()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).numpy()
    seconds.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(seconds) / 1e9


def forward_flops(model):
  """Multiply-add FLOPs (2 per MAC) of one image through Conv2D / Dense."""
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      _, h, w, c_out = layer.output.shape
      kh, kw, c_in, _ = layer.kernel.shape
      total += 2 * h * w * c_out * kh * kw * c_in
    elif isinstance(layer, keras.layers.Dense):
      c_in, c_out = layer.kernel.shape
      total += 2 * c_in * c_out
  return total


def _colour(images, seed):
  """1-channel synthetic shapes -> 3 channels, a random colour per image."""
  rng = np.random.default_rng(seed)
  colours = rng.uniform(0.3, 1.0, size=(len(images), 1, 1, 3))
  return np.clip(images * colours.astype(np.float32), 0, 1)


def data(name, split, count):
  """(images, labels) of the model's data set (count None: all)."""
  shape = MODELS[name]["shape"]
  seed = 0 if split == "train" else 1
  if name == "small_cnn":
    try:
      images, labels = fgr_tf.data.load("fashion_mnist", split,
                                        num_examples=count)
      return (fgr_tf.data.to_unit_float(images).numpy().reshape(
          (-1,) + shape), np.asarray(labels, np.int32))
    except (OSError, ValueError):
      return synthetic.shapes(count or 8192, size=shape[0], seed=seed)
  images, labels = synthetic.shapes(count, size=shape[0], seed=seed)
  return _colour(images, seed), labels


def trained_model(name, cache_dir):
  """The model, trained briefly once and cached (same weights every run)."""
  path = os.path.join(cache_dir, f"{name}.keras")
  if os.path.exists(path):
    return keras.saving.load_model(path)
  keras.utils.set_random_seed(0)
  images, labels = data(name, "train", None if name == "small_cnn" else 4096)
  # The small CNN as the quickstart's baseline: 3 epochs of Fashion-MNIST
  # with the pad-and-crop augmentation, weight decay 5e-4, lr 0.01 then
  # 0.001 (fgr_tf/experiment/configs/fashion_mnist_demo.py).
  small = name == "small_cnn"
  backbone = fgr_tf.backbones.build(name, 10, MODELS[name]["shape"],
                                    weight_decay=5e-4 if small else 0.0)
  model = fgr_tf.FGRModel(backbone, fgr_lambda=0.0, rs_sigma=0.0)
  steps = -(-len(images) // 128)
  learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
      [2 * steps], [0.01, 0.001]) if small else 0.01
  model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
                metrics=["accuracy"])
  model.fit(fgr_tf.data.make_dataset(images, labels, 128, train=True,
                                     augment_data=small),
            epochs=3 if small else 2, verbose=0)
  os.makedirs(cache_dir, exist_ok=True)
  backbone.save(path)
  return backbone


def settings_for(model_name, attack):
  settings = dict(SETTINGS[attack])
  if model_name == "vgg11" and "steps" in settings:
    settings["steps"] = max(1, round(settings["steps"] * _VGG_SCALE.value))
  return settings


def bound_flops(attack, settings, result, flops, classes):
  """Per-image FLOPs the attack's result needs (the module docstring)."""
  iterations = np.asarray(result.iterations, np.float64)
  if attack == "flow_pgd":
    work = np.full_like(iterations, settings["steps"] * 2 * flops)
  elif attack == "stadv":
    steps = settings["steps"]
    rounds = np.where(np.asarray(result.success),
                      np.floor(iterations / steps) + 1,
                      settings["search_steps"])
    work = rounds * steps * 2 * flops
  elif attack == "adef":
    k = min(10, classes - 1)
    work = iterations * (1 + k) * flops
  else:
    work = iterations * flops
  return float(work.mean())


def time_attack(model, attack, settings, images, labels, repeats):
  run = lambda: fgr_tf.attacks.make(attack, **settings)(
      model, images, labels, jit_compile=_JIT.value)
  # Traces (a first call, then the retrace for any batch size); the time
  # includes the first call's oneDNN set-up at the timed batch shapes.
  run_on = lambda n: fgr_tf.attacks.make(attack, **settings)(
      model, images[:n], labels[:n], jit_compile=_JIT.value)
  run_on(4).success.numpy()
  run_on(8).success.numpy()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = run()
    result.success.numpy()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), result


def time_paired(models, attack, settings, images, labels, switch, rounds,
                jit_compile=False):
  """{"on": [s per call], "off": [...]}: the attack with `switch`
  (`bench.switches.SWITCHES`) on and off, on `models[setting]` (two copies
  of one model, so that each keeps the trace made with its setting), the
  setting applied again before each call (for switches read at the
  call); each traced on 4 and 8 images and run once on the batch, then
  `rounds` rounds of one call each, alternating which goes first. The
  defaults are restored."""
  # Here, not at the top: bench.switches defines bench.steps' flags, which
  # clash with those of the modules that import this one (flop_bound).
  from bench import switches  # pylint: disable=g-import-not-at-top
  switches.check(switch)

  def call(setting, count=None):
    switches.SWITCHES[switch][setting]()
    fgr_tf.attacks.make(attack, **settings)(
        models[setting], images[:count], labels[:count],
        jit_compile=jit_compile).success.numpy()

  try:
    for setting in ("on", "off"):
      for count in (4, 8, None):
        call(setting, count)
    return switches.alternate(call, rounds)
  finally:
    switches.SWITCHES[switch]["on"]()


def format_paired(name, attack, seconds, batch):
  ratios = [off / on for on, off in zip(seconds["on"], seconds["off"])]
  return (f"{name} {attack}: on {statistics.median(seconds['on']) / batch:.5f}"
          f" s/image, off {statistics.median(seconds['off']) / batch:.5f}; "
          f"off / on per round: median {statistics.median(ratios):.3f}, mean "
          f"{statistics.mean(ratios):.3f}, range {min(ratios):.3f}-"
          f"{max(ratios):.3f} ({len(ratios)} rounds)")


def profile_attack(model, attack, settings, images, labels):
  from bench import profile_ops  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(logdir)
    fgr_tf.attacks.make(attack, **settings)(
        model, images, labels, jit_compile=_JIT.value).success.numpy()
    tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*",
                                     "*.xplane.pb"))
    print(profile_ops.format_table(profile_ops.op_times(path), 15))


def compare(path_a, path_b):
  a, b = np.load(path_a), np.load(path_b)
  for key in sorted(set(a.files) & set(b.files)):
    if key.endswith("/flow"):
      diff = np.abs(a[key] - b[key]).max()
      print(f"{key:<32} max |flow difference| {diff:.3g} px")
    else:
      equal = np.mean(a[key] == b[key]) if not key.endswith(
          "t_norm") else np.mean(np.isclose(a[key], b[key], atol=1e-4))
      print(f"{key:<32} equal on {equal:.1%} of images; means "
            f"{a[key].mean():.4g} vs {b[key].mean():.4g}")


def main(argv):
  del argv
  if _COMPARE.value:
    compare(*_COMPARE.value)
    return
  print(f"CPU: {cpu_model_name()}; ONEDNN_MAX_CPU_ISA="
        f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; TF "
        f"{tf.__version__}; {os.cpu_count()} cores")
  if _PAIRED_SWITCH.value:
    for name in _MODELS.value:
      batch = MODELS[name]["batch"]
      images, labels = data(name, "test", batch)
      models = {setting: trained_model(name, _CACHE.value)
                for setting in ("on", "off")}
      for attack in _ATTACKS.value:
        seconds = time_paired(models, attack, settings_for(name, attack),
                              images, labels, _PAIRED_SWITCH.value,
                              _PAIRED_ROUNDS.value, _JIT.value)
        print(format_paired(name, attack, seconds, batch))
    return
  gflops = matmul_gflops()
  print(f"sustained matmul: {gflops:.0f} GFLOP/s (2048^2 float32)")
  saved, rows = {}, []
  for name in _MODELS.value:
    model = trained_model(name, _CACHE.value)
    batch = MODELS[name]["batch"]
    images, labels = data(name, "test", batch)
    flops = forward_flops(model)
    clean = np.mean(np.argmax(model(images, training=False), -1) == labels)
    print(f"\n{name} {MODELS[name]['shape']}, batch {batch}: forward "
          f"{flops / 1e6:.1f} MFLOP/image, clean accuracy {clean:.3f}")
    print(f"{'attack':<12}{'s/image':>10}{'bound':>10}{'ratio':>8}"
          f"{'success':>9}{'mean it':>9}{'mean T':>8}  settings")
    for attack in _ATTACKS.value:
      settings = settings_for(name, attack)
      seconds, result = time_attack(model, attack, settings, images, labels,
                                    _REPEATS.value)
      per_image = seconds / batch
      bound = bound_flops(attack, settings, result, flops,
                          model.output_shape[-1]) / (gflops * 1e9)
      success = result.success.numpy()
      print(f"{attack:<12}{per_image:>10.4f}{bound:>10.4f}"
            f"{per_image / bound:>8.1f}{success.mean():>9.3f}"
            f"{result.iterations.numpy().mean():>9.1f}"
            f"{result.t_norm.numpy()[success].mean():>8.3f}  {settings}")
      rows.append(dict(model=name, attack=attack, seconds_per_image=per_image,
                       bound=bound, gflops=gflops,
                       isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
                       success=float(success.mean())))
      for field in ("success", "iterations", "t_norm", "flow"):
        saved[f"{name}/{attack}/{field}"] = getattr(result, field).numpy()
      if _PROFILE.value:
        profile_attack(model, attack, settings, images, labels)
  if _SAVE.value:
    np.savez_compressed(_SAVE.value, **saved)
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
