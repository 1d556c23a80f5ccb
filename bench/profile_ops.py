"""Where a step's time goes: total time per TF op type, from tf.profiler.

  python -m bench.profile_ops --model vgg11 --batch 128 --mode fgr

runs --warmup untimed steps, traces --steps steps with
`tf.profiler.experimental`, and prints the op types that took the most
time (milliseconds per step, summed over the CPU threads that ran them, so
the total can exceed the wall time on several cores), with their share and
call counts; `--by_layer` groups by the Keras layer instead (all of a
layer's forward and gradient ops). Reads the trace's XPlane proto
directly: no TensorBoard plugin needed. Modes are those of `bench.steps` (plain, fgr, igr, at,
fgr_at, eval, flow_pgd).
"""

import collections
import glob
import os
import re
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

import fgr_tf  # noqa: E402
from bench import steps  # noqa: E402


# oneDNN's rewrites of TF ops (e.g. "_MklNativeConv2DBackpropFilter").
_ONEDNN_PREFIXES = ("_MklNative", "_Mkl", "_")


def _layer_of(op_name):
  """"gradient_tape/vgg11_1/conv5_1/convolution/Conv2D" -> "conv5"."""
  parts = [p for p in op_name.split("/") if p != "gradient_tape"]
  if len(parts) < 3:
    return "(outside layers)"
  return re.sub(r"_\d+$", "", parts[1])


def op_times(xspace_path, by_layer=False):
  """{op type (or layer): (total ms, calls)} over the host plane's TF ops.

  TF's executor names each op event "<op name>:<op type>"; events without
  a ":" and bookkeeping ("ExecutorState::Process") are skipped, since they
  contain the ops and would count them twice; oneDNN's "_MklNative" prefix
  is dropped.
  """
  space = xplane_pb2.XSpace()
  with open(xspace_path, "rb") as f:
    space.ParseFromString(f.read())
  totals = collections.defaultdict(lambda: [0.0, 0])
  for plane in space.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        name = names.get(event.metadata_id, "")
        if ":" not in name or "::" in name or name.startswith("$"):
          continue
        op_type = name.rsplit(":", 1)[1]
        for prefix in _ONEDNN_PREFIXES:
          op_type = op_type.removeprefix(prefix)
        if not op_type[:1].isupper() or " " in op_type:
          continue
        key = _layer_of(name.rsplit(":", 1)[0]) if by_layer else op_type
        totals[key][0] += event.duration_ps / 1e9
        totals[key][1] += 1
  return {k: tuple(v) for k, v in totals.items()}


def profile(mode, model_name, batch, size, channels, classes, warmup,
            num_steps, logdir, by_layer=False):
  """Traces `num_steps` steps of `mode`; returns op_times per step."""
  images, labels = steps.synthetic_batch(batch, size, channels, classes)
  backbone = fgr_tf.backbones.build(model_name, classes, (size, size, channels))
  step = steps.make_step(mode, backbone, images, labels, jit_compile=False)
  for _ in range(warmup):
    step()
  tf.profiler.experimental.start(logdir)
  for _ in range(num_steps):
    step()
  tf.profiler.experimental.stop()
  (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*",
                                   "*.xplane.pb"))
  return {k: (ms / num_steps, calls / num_steps)
          for k, (ms, calls) in op_times(path, by_layer).items()}


def format_table(times, top, key_name="op type"):
  total = sum(ms for ms, _ in times.values())
  lines = [f"{key_name:<36}{'ms/step':>10}{'share':>8}{'calls/step':>12}"]
  for op, (ms, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f"{op:<36}{ms:>10.1f}{ms / total:>8.1%}{calls:>12.0f}")
  lines.append(f"{'all ops':<36}{total:>10.1f}")
  return "\n".join(lines)


def main(argv):
  del argv
  flags_ = flags.FLAGS
  with tempfile.TemporaryDirectory() as logdir:
    times = profile(flags_.mode, flags_.model, flags_.batch, flags_.image_size,
                    flags_.channels, flags_.classes, flags_.warmup,
                    flags_.steps, logdir, flags_.by_layer)
  print(f"{flags_.model} batch {flags_.batch}, mode {flags_.mode}, "
        f"{flags_.steps} traced steps")
  print(format_table(times, flags_.top,
                     "layer (all its ops)" if flags_.by_layer else "op type"))


if __name__ == "__main__":
  flags.DEFINE_string("mode", "fgr", "Which step to profile.")
  flags.DEFINE_integer("steps", 3, "Traced steps.")
  flags.DEFINE_integer("top", 25, "How many rows to print.")
  flags.DEFINE_bool("by_layer", False, "Group by the Keras layer that ran "
                    "the op (forward and gradient ops alike), not by type.")
  app.run(main)
