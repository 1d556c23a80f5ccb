"""Soak test of an exported SavedModel: random valid and invalid requests.

  python -m bench.serving_soak --export_dir=runs/x/saved_model --requests=1000

Sends batches of random size (1-16) to the loaded signatures: valid float32
[0, 1] and uint8 images, and invalid ones (wrong dtype, rank, channels or
size, 0-255 floats, negatives, NaN). Every valid request must return
probabilities that sum to 1; every invalid one must be rejected. Prints the
process RSS after loading, after a warm-up of --warmup requests, and at the
end: memory must not grow with the number of requests.
"""

import os
import random

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.memory import rss_mb  # noqa: E402

REJECTED = (TypeError, ValueError, tf.errors.InvalidArgumentError)
INVALID_KINDS = ("uint8_to_float", "float_to_uint8", "int32", "rank3",
                 "channels", "size", "0-255 floats", "negative", "nan")


def _request(kind, shape, rng):
  """(signature name, images) for one request of `kind`."""
  batch = rng.randint(1, 16)
  h, w, c = shape
  floats = np.random.default_rng(rng.randint(0, 2**31)).uniform(
      size=(batch, h, w, c)).astype(np.float32)
  if kind == "valid_float":
    return "serving_default", floats
  if kind == "valid_uint8":
    return "serving_uint8", (floats * 255).astype(np.uint8)
  if kind == "uint8_to_float":
    return "serving_default", (floats * 255).astype(np.uint8)
  if kind == "float_to_uint8":
    return "serving_uint8", floats
  if kind == "int32":
    return "serving_default", (floats * 255).astype(np.int32)
  if kind == "rank3":
    return "serving_default", floats[0]
  if kind == "channels":
    return "serving_default", np.concatenate([floats, floats], -1)
  if kind == "size":
    return "serving_default", floats[:, :-1]
  if kind == "0-255 floats":
    return "serving_default", floats * 255
  if kind == "negative":
    return "serving_default", floats - 0.5
  if kind == "nan":
    floats[0, 0, 0, 0] = np.nan
    return "serving_default", floats
  raise ValueError(kind)


def soak(export_dir, requests=1000, warmup=100, seed=0):
  """Runs the soak; returns counts and RSS figures (MiB)."""
  loaded = tf.saved_model.load(export_dir)
  signatures = {name: loaded.signatures[name]
                for name in ("serving_default", "serving_uint8")}
  spec = signatures["serving_default"].structured_input_signature[1]
  shape = tuple(spec["images"].shape[1:])
  rng = random.Random(seed)
  kinds = ("valid_float", "valid_uint8") * 4 + INVALID_KINDS
  stats = {"rss_loaded_mb": rss_mb()[0], "accepted": 0, "rejected": 0,
           "wrong": []}
  for i in range(requests):
    if i == warmup:
      stats["rss_warm_mb"] = rss_mb()[0]
    kind = rng.choice(kinds)
    name, images = _request(kind, shape, rng)
    try:
      out = signatures[name](images=tf.constant(images))
      ok = kind.startswith("valid") and np.allclose(
          out["probabilities"].numpy().sum(-1), 1.0, atol=1e-4)
      stats["accepted"] += 1
    except REJECTED:
      ok = not kind.startswith("valid")
      stats["rejected"] += 1
    if not ok:
      stats["wrong"].append(kind)
  stats["rss_end_mb"] = rss_mb()[0]
  stats.setdefault("rss_warm_mb", stats["rss_loaded_mb"])
  stats["requests"] = requests
  return stats


def main(argv):
  del argv
  flag = flags.FLAGS
  stats = soak(flag.export_dir, flag.requests, flag.warmup)
  print(f"{stats['requests']} requests: {stats['accepted']} accepted, "
        f"{stats['rejected']} rejected, {len(stats['wrong'])} wrong "
        f"{sorted(set(stats['wrong']))}")
  print(f"RSS MiB: loaded {stats['rss_loaded_mb']:.1f}, after "
        f"{flag.warmup} requests {stats['rss_warm_mb']:.1f}, at the end "
        f"{stats['rss_end_mb']:.1f} (growth after warm-up "
        f"{stats['rss_end_mb'] - stats['rss_warm_mb']:+.1f})")


if __name__ == "__main__":
  # Defined here, not at import: bench.steps defines --warmup too.
  flags.DEFINE_string("export_dir", None, "A SavedModel from fgr-export.")
  flags.DEFINE_integer("requests", 1000, "Requests to send.")
  flags.DEFINE_integer("warmup", 100, "Requests before the warm RSS "
                       "reading.")
  flags.mark_flags_as_required(["export_dir"])
  app.run(main)
