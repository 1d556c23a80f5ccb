"""Prints how far fgr_tf is from the original's golden values.

  .venv/bin/python tests/golden_report.py

The numbers quoted in README.md ("Agreement with the original") come from
this script; test_regularizers.py asserts the bounds. It also prints what
lower precision costs (docs/PERFORMANCE.md): the gradient of
ce + lam * penalty under float32 and the mixed policies, against float64.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fgr_tf  # noqa: E402
from fgr_tf import regularizers  # noqa: E402
from fgr_tf.backbones import batch_norm  # noqa: E402
from conftest import load_npz  # noqa: E402
from test_regularizers import (  # noqa: E402
    H, W, build_golden_vgg, golden_key, interior_penalty)


def report(golden):
  model = build_golden_vgg(golden)
  images, labels = tf.constant(golden["images"]), tf.constant(golden["labels"])
  with tf.GradientTape() as tape:
    loss, input_grad, _ = regularizers.loss_and_input_gradient(
        model, images, labels)
    flow_grad = regularizers.flow_gradient_from_input_gradient(images,
                                                               input_grad)
    xy = fgr_tf.pixel_flow_gradient_to_normalized(flow_grad, H, W)
    interior = interior_penalty(xy)
    total = loss + float(golden["lam"]) * interior
  ref = golden["flow_grad_xy_normalized"]
  ours = xy.numpy()
  flow_diff = max(np.abs(ours[:, :, :W - 1, 0] - ref[:, :, :W - 1, 0]).max(),
                  np.abs(ours[:, :H - 1, :, 1] - ref[:, :H - 1, :, 1]).max())
  grads = tape.gradient(total, model.trainable_variables)
  worst = {}
  for variable, grad in zip(model.trainable_variables, grads):
    key = golden_key(variable)
    if key.startswith("conv") and key.endswith("bias"):
      continue  # zero up to round-off: BatchNorm follows every conv
    expected = golden[key + "_grad"]
    worst[key] = np.abs(grad.numpy() - expected).max() / np.abs(
        expected).max()
  return {
      "ce_abs_diff": abs(float(loss) - float(golden["ce"])),
      "flow_grad_max_diff_over_max": flow_diff / np.abs(ref).max(),
      "penalty": float(regularizers.penalty_from_flow_gradient(flow_grad)),
      "interior_penalty_rel_diff": abs(float(interior) - golden["penalty"]) /
                                   golden["penalty"],
      "param_grad_worst_max_diff_over_max": max(worst.values()),
      "param_grad_worst_variable": max(worst, key=worst.get),
  }


def objective_gradients(golden, dtype):
  """(ce, penalty, flat parameter gradient of ce + lam * penalty)."""
  model = build_golden_vgg(golden, dtype)
  float_type = "float64" if dtype == "float64" else "float32"
  images = tf.constant(golden["images"], float_type)
  with tf.GradientTape() as tape:
    loss, penalty = regularizers.flow_gradient_penalty(
        model, images, tf.constant(golden["labels"]))
    total = loss + float(golden["lam"]) * penalty
  grads = tape.gradient(total, model.trainable_variables)
  flat = np.concatenate([
      tf.cast(g, tf.float64).numpy().ravel()
      for v, g in zip(model.trainable_variables, grads)
      if not golden_key(v).startswith("conv") or
      not golden_key(v).endswith("bias")])  # conv biases: ~0 before BN
  return float(loss), float(penalty), flat


def precision_report(golden):
  """{policy: errors against float64} for float32 and the mixed policies."""
  ce64, penalty64, grad64 = objective_gradients(golden, "float64")
  rows = {}
  for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
    ce, penalty, grad = objective_gradients(golden, policy)
    rows[policy] = {
        "ce_rel_err": abs(ce - ce64) / ce64,
        "penalty_rel_err": abs(penalty - penalty64) / penalty64,
        "grad_rel_err": np.linalg.norm(grad - grad64) / np.linalg.norm(grad64),
        "grad_cosine": grad @ grad64 / np.linalg.norm(grad) /
                       np.linalg.norm(grad64),
    }
  return rows


def main():
  golden = load_npz("golden_shared32.npz")
  print("fgr_tf BatchNormalization:")
  for key, value in report(golden).items():
    print(f"  {key}: {value}")
  print(f"  golden penalty: {golden['penalty']}, tfa-based penalty: "
        f"{load_npz('tfa_shared32.npz')['penalty']}")
  # The same with Keras's own BatchNormalization (stop_gradient in moments).
  original = batch_norm.BatchNormalization._moments
  batch_norm.BatchNormalization._moments = (
      keras.layers.BatchNormalization._moments)
  try:
    print("keras.layers.BatchNormalization:")
    for key, value in report(golden).items():
      print(f"  {key}: {value}")
  finally:
    batch_norm.BatchNormalization._moments = original
  print("precision: errors against float64 (gradient of ce + lam * penalty "
        "w.r.t. all weights):")
  for policy, row in precision_report(golden).items():
    print(f"  {policy}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))


if __name__ == "__main__":
  main()
