"""Path switches (each default against its alternative), timed against
each other over fresh traces.

  python -m bench.switches --switch=fold --modes=eval,flow_pgd
  python -m bench.switches --switch=pool_loop --modes=flow_pgd
  python -m bench.switches --switch=pool_second --modes=fgr
  python -m bench.switches --switch=bn_second --modes=fgr,plain

`--switch=fold`: BatchNorms folded into their convolutions
(`fgr_tf.backbones.inference_function`) against unfolded
(FGR_TF_FOLD_BATCHNORM=0). `--switch=pool_loop`: max pooling's first
derivative inside loops by XLA (`pooling.LOOP_GRADIENT = "xla"`) against
TF's MaxPoolGrad ("native"). `--switch=pool_second`: max pooling's second
derivative as one XLA computation (`pooling.SECOND_DERIVATIVE = "xla"`)
against the mask as TF ops ("ops"). `--switch=bn_second`: train-mode
BatchNorm's second-derivative elementwise passes by XLA
(`train_batch_norm.ELEMENTWISE = "xla"`) against TF ops ("ops").
`--switch=read_once`: attacks read, fold and transform the weights once
per call, outside their loops (`attacks.common.READ_WEIGHTS_ONCE`),
against at every use. `--switch=xla_winograd`: the attacks' 4x4 and 8x8
layers by Winograd with XLA transforms
(`gemm_conv.Conv2D.XLA_WINOGRAD_MAX_PIXELS`) against Winograd's matrix
transforms (4x4) and oneDNN's kernels (8x8). `--switch=first_layer`: the
attacks' first-layer input gradient by a matmul (`few_channels.GRADIENT =
"matmul"`) against oneDNN's ("native"). `--switch=deform`: the attacks'
deform (warp, clip, their gradients) as XLA computations
(`attacks.common.DEFORM_BY_XLA`) against TF ops.
`--switch=first_block`: the attacks' first block on gray images at a
fixed batch as one operation (`first_block.block`: pool and ReLU by XLA
keeping the winners, the input gradient one XLA computation from them)
against the folded convolution, TF's pool and ReLU ("ops").
`--switch=adef_first_block`: ADef's first block for all candidates by XLA
(`attacks.adef.FIRST_BLOCK = "xla"`) against pfor; `bench.steps` has no
ADef mode: time it with `python -m bench.attacks
--paired_switch=adef_first_block` (trained models, real images).
Each of --traces rounds builds a fresh model
per setting (so each gets its own trace: oneDNN's graph rewrites can
differ between traces), runs one untimed call, then times --repeats calls
and keeps the best; settings alternate within a round; --model, --batch,
--image_size etc. are `bench.steps`' flags. Prints the ms per call of
every trace and, per mode, the ratio of the mean times (off / on: > 1
means the switch's default is faster). `--paired_rounds=N` instead traces
one model per setting once and alternates N rounds of --repeats calls
between them (for switches that do not depend on the trace: finer on a
noisy machine); it also prints the median of the per-round ratios.
Modes are `bench.steps`' (eval: one
inference forward, flow_pgd: the 10-step attack, plain / fgr: training
steps).
"""

import importlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import fgr_tf  # noqa: E402
from bench import steps  # noqa: E402
from fgr_tf.attacks import common  # noqa: E402
from fgr_tf.backbones import few_channels  # noqa: E402
from fgr_tf.backbones import first_block  # noqa: E402
from fgr_tf.backbones import gemm_conv  # noqa: E402
from fgr_tf.backbones import pooling  # noqa: E402
from fgr_tf.backbones import train_batch_norm  # noqa: E402
from fgr_tf.backbones import winograd  # noqa: E402

# The module (fgr_tf.attacks.adef is the function).
_adef = importlib.import_module("fgr_tf.attacks.adef")

SWITCHES = {
    # setting name -> function applying it before a model is built/traced.
    "fold": {"on": lambda: os.environ.pop("FGR_TF_FOLD_BATCHNORM", None),
             "off": lambda: os.environ.update(FGR_TF_FOLD_BATCHNORM="0")},
    "pool_loop": {"on": lambda: setattr(pooling, "LOOP_GRADIENT", "xla"),
                  "off": lambda: setattr(pooling, "LOOP_GRADIENT", "native")},
    "pool_second": {
        "on": lambda: setattr(pooling, "SECOND_DERIVATIVE", "xla"),
        "off": lambda: setattr(pooling, "SECOND_DERIVATIVE", "ops")},
    "read_once": {
        "on": lambda: setattr(common, "READ_WEIGHTS_ONCE", True),
        "off": lambda: setattr(common, "READ_WEIGHTS_ONCE", False)},
    "bn_second": {
        "on": lambda: setattr(train_batch_norm, "ELEMENTWISE", "xla"),
        "off": lambda: setattr(train_batch_norm, "ELEMENTWISE", "ops")},
    "xla_winograd": {
        "on": lambda: setattr(gemm_conv.Conv2D, "XLA_WINOGRAD_MAX_PIXELS",
                              winograd.XLA_MAX_PIXELS),
        "off": lambda: setattr(gemm_conv.Conv2D, "XLA_WINOGRAD_MAX_PIXELS",
                               0)},
    "first_layer": {
        "on": lambda: setattr(few_channels, "GRADIENT", "matmul"),
        "off": lambda: setattr(few_channels, "GRADIENT", "native")},
    "deform": {"on": lambda: setattr(common, "DEFORM_BY_XLA", True),
               "off": lambda: setattr(common, "DEFORM_BY_XLA", False)},
    "first_block": {
        "on": lambda: setattr(first_block, "BLOCK", "xla"),
        "off": lambda: setattr(first_block, "BLOCK", "ops")},
    # Read when ADef is called (part of its cache key): time it with
    # `python -m bench.attacks --paired_switch=adef_first_block`.
    "adef_first_block": {
        "on": lambda: setattr(_adef, "FIRST_BLOCK", "xla"),
        "off": lambda: setattr(_adef, "FIRST_BLOCK", "pfor")},
}


def check(switch):
  if switch not in SWITCHES:
    raise ValueError(f"Unknown switch {switch!r}. Expected one of "
                     f"{sorted(SWITCHES)}.")


def _traced_step(switch, setting, mode, model_name, classes, images,
                 labels):
  """A fresh model's step of `mode`, traced (run once) with `setting`."""
  SWITCHES[switch][setting]()
  backbone = fgr_tf.backbones.build(model_name, classes,
                                    tuple(images.shape[1:]))
  step = steps.make_step(mode, backbone, images, labels, jit_compile=False)
  step()
  return step


def run(switch, modes, model_name="vgg11", batch=128, size=32, channels=3,
        classes=10, traces=3, calls=2):
  """{mode: {"on": [ms per trace], "off": [...]}}."""
  check(switch)
  images, labels = steps.synthetic_batch(batch, size, channels, classes)
  times = {mode: {"on": [], "off": []} for mode in modes}
  try:
    for _ in range(traces):
      for mode in modes:
        for setting in ("on", "off"):
          step = _traced_step(switch, setting, mode, model_name, classes,
                              images, labels)
          best = float("inf")
          for _ in range(calls):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
          times[mode][setting].append(best * 1e3)
  finally:
    SWITCHES[switch]["on"]()  # the defaults
  return times


def run_paired(switch, modes, model_name="vgg11", batch=128, size=32,
               channels=3, classes=10, rounds=12, calls=2):
  """{mode: {"on": [ms per round], "off": [...]}}: one model per setting,
  each traced once (with its setting), then `rounds` rounds that time
  `calls` calls of each (mean), alternating which goes first. Finer than
  `run` for switches that do not depend on the trace (training steps):
  both models see the same minutes of a noisy machine."""
  check(switch)
  images, labels = steps.synthetic_batch(batch, size, channels, classes)
  times = {}
  try:
    for mode in modes:
      step_of = {setting: _traced_step(switch, setting, mode, model_name,
                                       classes, images, labels)
                 for setting in ("on", "off")}

      def call(setting, step_of=step_of):
        for _ in range(calls):
          step_of[setting]()

      times[mode] = {setting: [s / calls * 1e3 for s in seconds]
                     for setting, seconds in alternate(call, rounds).items()}
  finally:
    SWITCHES[switch]["on"]()  # the defaults
  return times


def alternate(call, rounds):
  """{"on": [s], "off": [s]}: the seconds of `call(setting)` for each
  setting in `rounds` rounds, alternating which goes first (both see the
  same minutes of a noisy machine)."""
  seconds = {"on": [], "off": []}
  for round_ in range(rounds):
    for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
      start = time.perf_counter()
      call(setting)
      seconds[setting].append(time.perf_counter() - start)
  return seconds


def format_times(times):
  lines = []
  for mode, by_setting in times.items():
    for setting, ms in by_setting.items():
      lines.append(f"{mode:10s} {setting:4s} " +
                   " ".join(f"{t:8.1f}" for t in ms) + " ms")
    ratio = (statistics.mean(by_setting["off"]) /
             statistics.mean(by_setting["on"]))
    lines.append(f"{mode:10s} mean off / mean on: {ratio:.3f}")
    paired = statistics.median(
        off / on for on, off in zip(by_setting["on"], by_setting["off"]))
    lines.append(f"{mode:10s} median of off / on per round: {paired:.3f}")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS  # model, batch, image_size, ... and modes: bench.steps'
  if f.paired_rounds:
    times = run_paired(f.switch, f.modes, f.model, f.batch, f.image_size,
                       f.channels, f.classes, f.paired_rounds, f.repeats)
  else:
    times = run(f.switch, f.modes, f.model, f.batch, f.image_size,
                f.channels, f.classes, f.traces, f.repeats)
  print(format_times(times))


if __name__ == "__main__":
  flags.DEFINE_enum("switch", "fold", sorted(SWITCHES), "What to compare.")
  flags.DEFINE_integer("traces", 3, "Rounds (fresh models per setting).")
  flags.DEFINE_integer("paired_rounds", 0, "If > 0: one model per setting, "
                       "this many alternating rounds (`run_paired`).")
  flags.FLAGS.set_default("modes", ["eval", "flow_pgd"])
  flags.FLAGS.set_default("repeats", 2)  # timed calls per trace, best kept
  app.run(main)
