"""fgr_tf's attacks against independent implementations, same weights and images.

  python -m bench.reference_attacks \\
      --reference_python=/work/venvs/reference/bin/python \\
      --original_dir=/path/to/Flow-Gradient-Regularization \\
      [--workdirs=runs/demo/baseline,runs/demo/fgr100] [--num_images=500]

Attacks the first --num_images Fashion-MNIST test images of each trained
small CNN (the quickstart's models, `make demo`) with fgr_tf's attacks (this
process, TensorFlow) and with reference implementations in PyTorch (a
subprocess in a separate virtualenv, like bench/compare.py; PyTorch and the
reference packages are test-time tools, never dependencies of fgr_tf):

  flow-PGD    the original's `multi_step` (attacks/gradient.py of
              xpf/Flow-Gradient-Regularization, imported from --original_dir)
              vs `flow_pgd` with padding "edge" and "zeros";
  stAdv       advertorch 0.2.3 `SpatialTransformAttack` (scipy L-BFGS-B)
              vs `stadv` (Adam);
  ADef        foolbox 2.4 `ADefAttack` vs `adef`;
  worst-of-k  ART `SpatialTransformation` (per image, same grid) vs
              `worst_of_k(grid=True)`.

The Keras weights are written to an .npz file and loaded into an equivalent
PyTorch module (conv3x3 + BatchNorm (inference) + ReLU + 2x2 max-pool twice,
flatten in NHWC order, Dense 128 + ReLU, Dense 10); the reference side checks
that its logits equal Keras's before attacking. Prints one Markdown table:
per attack, model and implementation, the success rate (on the correctly
classified images), mean and median T-norm (pixels, the largest per-pixel
displacement; over the successful attacks), robust accuracy and seconds per
image; then flow-PGD's paired differences. Writes everything to
--output_dir/results.json. docs/ATTACK_REFERENCES.md has the set-up and
the measured numbers.

The same file runs both sides: `--side=reference` is the PyTorch part (run
by the TensorFlow part with --reference_python; it imports neither
TensorFlow nor fgr_tf).
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layers of fgr_tf.backbones.small_cnn, in order, with their weights.
SMALL_CNN_WEIGHTS = {
    "conv0": ("kernel", "bias"),
    "bn0": ("gamma", "beta", "moving_mean", "moving_variance"),
    "conv1": ("kernel", "bias"),
    "bn1": ("gamma", "beta", "moving_mean", "moving_variance"),
    "fc": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
}

# Rows of the table: (attack, implementation, settings). Settings are the
# keyword arguments of the fgr_tf attack or of the reference call.
FLOW_PGD_STEPS = 100
STADV = dict(tau=0.05, steps=200, search_steps=3, learning_rate=0.05)
ADVERTORCH_STADV = dict(confidence=0, initial_const=1, max_iterations=1000,
                        search_steps=1, abort_early=True)
ADEF = dict(sigma=0.5, max_iter=100, overshoot=1.1, candidates=10)
ADEF_AS_FOOLBOX = dict(sigma=1.0, max_iter=100, overshoot=1.0, candidates=10)
FOOLBOX_ADEF = dict(max_iter=100, smooth=1.0, subsample=10)
FOOLBOX_ADEF_AS_OURS = dict(max_iter=100, smooth=0.5, subsample=10)
GRID = dict(max_angle=30.0, max_shift=0.1, grid=True)
ART_GRID = dict(max_translation=10.0, num_translations=5, max_rotation=30.0,
                num_rotations=31)
ATTACKS = ("flow_pgd", "stadv", "adef", "worst_of_k")


def rows_for(attacks, epsilons):
  """[(attack label, side, implementation, settings)] in table order."""
  rows = []
  for attack in attacks:
    if attack == "flow_pgd":
      for eps in epsilons:
        label = f"flow-PGD eps {eps:g}"
        for padding in ("edge", "zeros"):
          rows.append((label, "tf", f"fgr_tf flow_pgd padding={padding}",
                       dict(epsilon=eps, steps=FLOW_PGD_STEPS,
                            padding=padding)))
        rows.append((label, "reference", "original multi_step",
                     dict(epsilon=eps, iters=FLOW_PGD_STEPS)))
    elif attack == "stadv":
      rows.append(("stAdv", "tf", "fgr_tf stadv (Adam)", STADV))
      rows.append(("stAdv", "reference",
                   "advertorch SpatialTransformAttack", ADVERTORCH_STADV))
    elif attack == "adef":
      rows.append(("ADef", "tf", "fgr_tf adef", ADEF))
      rows.append(("ADef", "tf", "fgr_tf adef (foolbox's sigma, no "
                   "overshoot)", ADEF_AS_FOOLBOX))
      rows.append(("ADef", "reference", "foolbox ADefAttack", FOOLBOX_ADEF))
      rows.append(("ADef", "reference", "foolbox ADefAttack (our sigma)",
                   FOOLBOX_ADEF_AS_OURS))
    elif attack == "worst_of_k":
      rows.append(("worst-of-k grid", "tf", "fgr_tf worst_of_k", GRID))
      rows.append(("worst-of-k grid", "reference",
                   "ART SpatialTransformation (per image)", ART_GRID))
    else:
      raise ValueError(f"Unknown attack {attack!r}. Expected some of "
                       f"{ATTACKS}.")
  return rows


# --------------------------------------------------------------------------
# Weights: Keras -> npz, and a NumPy forward pass (what the PyTorch module
# computes), both usable without PyTorch.


def export_small_cnn(backbone):
  """{"conv0/kernel": array, ...} of an fgr_tf small_cnn backbone (float32),
  plus "bn{i}/epsilon"; kernels in Keras layouts (HWIO, [in, out])."""
  weights = {}
  for name, keys in SMALL_CNN_WEIGHTS.items():
    layer = backbone.get_layer(name)
    values = layer.get_weights()
    if len(values) != len(keys):
      raise ValueError(f"Layer {name} has {len(values)} weights, expected "
                       f"{keys}: not an fgr_tf small_cnn.")
    for key, value in zip(keys, values):
      weights[f"{name}/{key}"] = np.asarray(value, np.float32)
    if name.startswith("bn"):
      weights[f"{name}/epsilon"] = np.float32(layer.epsilon)
  return weights


def _conv3x3_same(x, kernel, bias):
  """NHWC 3x3 stride-1 'same' convolution (cross-correlation), float64."""
  padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
  height, width = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(3):
    for j in range(3):
      out += padded[:, i:i + height, j:j + width] @ kernel[i, j]
  return out + bias


def numpy_forward(weights, images):
  """Logits of the small CNN in float64 NumPy, from `export_small_cnn`'s
  dict; images NHWC in [0, 1]. The PyTorch module computes the same."""
  x = np.asarray(images, np.float64)
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  for i in range(2):
    x = _conv3x3_same(x, w[f"conv{i}/kernel"], w[f"conv{i}/bias"])
    x = (w[f"bn{i}/gamma"] * (x - w[f"bn{i}/moving_mean"]) /
         np.sqrt(w[f"bn{i}/moving_variance"] + w[f"bn{i}/epsilon"]) +
         w[f"bn{i}/beta"])
    x = np.maximum(x, 0.0)
    b, h, wd, c = x.shape
    x = x[:, :h // 2 * 2, :wd // 2 * 2].reshape(
        b, h // 2, 2, wd // 2, 2, c).max(axis=(2, 4))
  x = x.reshape(len(x), -1)  # NHWC order, as keras.layers.Flatten
  x = np.maximum(x @ w["fc/kernel"] + w["fc/bias"], 0.0)
  return x @ w["dense/kernel"] + w["dense/bias"]


# --------------------------------------------------------------------------
# Summaries and the table.


def summarize(correct, success, t_norm, adv_correct, seconds):
  """One row's numbers. `correct`: clean prediction right (both sides use
  Keras's); `success`, `t_norm`, `adv_correct` per image; T-norm statistics
  over the successful attacks on correctly classified images."""
  correct = np.asarray(correct, bool)
  hit = np.asarray(success, bool) & correct
  norms = np.asarray(t_norm, np.float64)[hit]
  return {
      "success_rate": float(hit.sum() / correct.sum()) if correct.any()
                      else None,
      "mean_t_norm": float(norms.mean()) if norms.size else None,
      "median_t_norm": float(np.median(norms)) if norms.size else None,
      "robust_accuracy": float((np.asarray(adv_correct, bool) &
                                correct).mean()),
      "seconds_per_image": float(seconds / len(correct)),
  }


def format_table(rows):
  """Markdown table of result rows (dicts with attack, model,
  implementation and `summarize`'s keys)."""
  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  lines = ["| attack | model | implementation | success | mean T-norm (px) "
           "| median T-norm (px) | robust acc | s/image |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['attack']} | {r['model']} | {r['implementation']} | "
        f"{fmt(r['success_rate'], '.3f')} | {fmt(r['mean_t_norm'], '.3f')} | "
        f"{fmt(r['median_t_norm'], '.3f')} | {r['robust_accuracy']:.3f} | "
        f"{r['seconds_per_image']:.4f} |")
  return "\n".join(lines)


def paired_difference(correct, ours_adv_correct, theirs_adv_correct):
  """Robust accuracy ours - theirs on the same images, the number of images
  on which the two disagree, and the standard error of the difference
  (paired binary outcomes: sqrt(b + c - (b - c)^2 / n) / n)."""
  a = np.asarray(ours_adv_correct, bool) & np.asarray(correct, bool)
  b = np.asarray(theirs_adv_correct, bool) & np.asarray(correct, bool)
  n = len(a)
  only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
  se = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0)) / n
  return {"difference": (only_a - only_b) / n, "disagreements":
          only_a + only_b, "standard_error": se}


def format_paired(pairs):
  lines = ["| flow-PGD | model | fgr_tf padding | robust acc fgr_tf - original"
           " | images that disagree | standard error |", "|---|---|---|---|---|"
           "---|"]
  for p in pairs:
    lines.append(f"| eps {p['epsilon']:g} | {p['model']} | {p['padding']} | "
                 f"{p['difference']:+.3f} | {p['disagreements']} | "
                 f"{p['standard_error']:.3f} |")
  return "\n".join(lines)


def paired_t_norms(rows):
  """For stAdv, ADef and worst-of-k: each fgr_tf row against each reference
  row of the same attack and model, on the correctly classified images that
  BOTH fooled: their median T-norms and the share where fgr_tf's is smaller
  (success rates alone favour an attack that only fools easy images)."""
  pairs = []
  for ours in rows:
    if ours["side"] != "tf" or ours["attack"].startswith("flow-PGD"):
      continue
    for theirs in rows:
      if (theirs["side"] != "reference" or theirs["attack"] !=
          ours["attack"] or theirs["model"] != ours["model"]):
        continue
      a, b = ours["per_image"], theirs["per_image"]
      # success is only counted on correctly classified images: a clean
      # misclassification is "robust accuracy 0" and success on both sides.
      both = (np.asarray(a["success"]) & np.asarray(b["success"]) &
              np.asarray(ours["correct"]))
      ta = np.asarray(a["t_norm"])[both]
      tb = np.asarray(b["t_norm"])[both]
      pairs.append(dict(
          attack=ours["attack"], model=ours["model"],
          ours=ours["implementation"], theirs=theirs["implementation"],
          both=int(both.sum()),
          median_ours=float(np.median(ta)) if both.any() else None,
          median_theirs=float(np.median(tb)) if both.any() else None,
          ours_smaller=float((ta < tb).mean()) if both.any() else None))
  return pairs


def format_paired_t_norms(pairs):
  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  lines = ["| attack | model | fgr_tf | reference | both fooled | median "
           "T-norm fgr_tf (px) | median T-norm reference (px) | fgr_tf "
           "smaller |", "|---|---|---|---|---|---|---|---|"]
  for p in pairs:
    lines.append(f"| {p['attack']} | {p['model']} | {p['ours']} | "
                 f"{p['theirs']} | {p['both']} | "
                 f"{fmt(p['median_ours'], '.3f')} | "
                 f"{fmt(p['median_theirs'], '.3f')} | "
                 f"{fmt(p['ours_smaller'], '.2f')} |")
  return "\n".join(lines)


# --------------------------------------------------------------------------
# TensorFlow side (this virtualenv).


def _tf_attack(backbone, attack, settings, images, labels, batch):
  """Runs one fgr_tf attack over all images in batches, after an untimed
  warm-up on the first batch (tracing); returns per-image arrays and the
  timed seconds."""
  from fgr_tf import attacks  # pylint: disable=g-import-not-at-top
  settings = dict(settings)
  fn = {"flow-PGD": attacks.flow_pgd, "stAdv": attacks.stadv,
        "ADef": attacks.adef, "worst-of-k grid": attacks.worst_of_k}[
            attack.split(" eps")[0]]
  fn(backbone, images[:batch], labels[:batch], **settings)
  success, t_norm, adv_pred = [], [], []
  start = time.perf_counter()
  for i in range(0, len(images), batch):
    result = fn(backbone, images[i:i + batch], labels[i:i + batch],
                **settings)
    success.append(result.success.numpy())
    t_norm.append(result.t_norm.numpy())
    adv_pred.append(np.argmax(result.adv_logits.numpy(), -1))
  seconds = time.perf_counter() - start
  return (np.concatenate(success), np.concatenate(t_norm),
          np.concatenate(adv_pred), seconds)


def _load(workdir, checkpoint):
  import keras  # pylint: disable=g-import-not-at-top
  import fgr_tf  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  model = keras.saving.load_model(os.path.join(workdir,
                                               f"{checkpoint}.keras"))
  return getattr(model, "backbone", model)


def run(args):
  """The TensorFlow side: fgr_tf's rows here, the reference rows in the
  reference virtualenv; returns the result rows and paired differences."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from fgr_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  attacks = [a for a in args.attacks.split(",") if a]
  epsilons = [float(e) for e in args.epsilons.split(",") if e]
  rows = rows_for(attacks, epsilons)
  if any(side == "reference" and impl.startswith("original")
         for _, side, impl, _ in rows) and not args.original_dir:
    raise SystemExit("--original_dir (a checkout of "
                     "xpf/Flow-Gradient-Regularization) is needed for "
                     "flow_pgd.")
  if args.original_dir and not os.path.exists(
      os.path.join(args.original_dir, "attacks", "gradient.py")):
    raise SystemExit(f"--original_dir={args.original_dir} has no "
                     "attacks/gradient.py: not a checkout of "
                     "xpf/Flow-Gradient-Regularization.")
  images, labels = data_lib.load("fashion_mnist", "test",
                                 num_examples=args.num_images)
  images = data_lib.to_unit_float(images).numpy()
  labels = np.asarray(labels, np.int32)
  os.makedirs(args.output_dir, exist_ok=True)
  results, pairs = [], []
  for workdir in args.workdirs.split(","):
    model_name = os.path.basename(os.path.normpath(workdir))
    backbone = _load(workdir, args.checkpoint)
    logits = backbone.predict(images, batch_size=args.batch, verbose=0)
    correct = np.argmax(logits, -1) == labels
    print(f"{model_name}: clean accuracy {correct.mean():.3f} on "
          f"{len(images)} images", flush=True)
    per_image = {}
    for index, (attack, side, impl, settings) in enumerate(rows):
      if side != "tf":
        continue
      success, t_norm, adv_pred, seconds = _tf_attack(
          backbone, attack, settings, images, labels, args.batch)
      per_image[index] = (success, t_norm, adv_pred == labels, seconds)
      print(f"  {attack} / {impl}: {seconds:.1f} s", flush=True)
    reference_rows = [(i, r) for i, r in enumerate(rows)
                      if r[1] == "reference"]
    if reference_rows:
      exchange = os.path.join(args.output_dir, f"{model_name}_input.npz")
      output = os.path.join(args.output_dir, f"{model_name}_reference.npz")
      np.savez(exchange, images=images, labels=labels, keras_logits=logits,
               rows=json.dumps([[i, a, impl, s]
                                for i, (a, _, impl, s) in reference_rows]),
               **export_small_cnn(backbone))
      command = [args.reference_python, str(pathlib.Path(__file__).resolve()),
                 "--side=reference", f"--input={exchange}",
                 f"--output={output}", f"--threads={args.threads}",
                 f"--batch={args.batch}", f"--art_check={args.art_check}",
                 f"--stadv_batch={args.stadv_batch}"]
      if args.original_dir:
        command.append(f"--original_dir={args.original_dir}")
      subprocess.run(command, check=True)
      with np.load(output) as ref:
        for index, _ in reference_rows:
          per_image[index] = (ref[f"{index}/success"], ref[f"{index}/t_norm"],
                              ref[f"{index}/adv_pred"] == labels,
                              float(ref[f"{index}/seconds"]))
        print(f"  reference logits agree with Keras to "
              f"{float(ref['max_logit_difference']):.2e}; same clean "
              f"predictions: {np.array_equal(ref['clean_pred'], np.argmax(logits, -1))}",
              flush=True)
    for index, (attack, side, impl, settings) in enumerate(rows):
      success, t_norm, adv_correct, seconds = per_image[index]
      results.append(dict(
          attack=attack, model=model_name, implementation=impl, side=side,
          settings=settings,
          **summarize(correct, success, t_norm, adv_correct, seconds),
          correct=correct.tolist(),
          per_image=dict(success=np.asarray(success, bool).tolist(),
                         t_norm=np.asarray(t_norm, float).round(5).tolist(),
                         adv_correct=np.asarray(adv_correct,
                                                bool).tolist())))
    for eps in epsilons if "flow_pgd" in attacks else ():
      label = f"flow-PGD eps {eps:g}"
      by_impl = {r[2]: per_image[i] for i, r in enumerate(rows)
                 if r[0] == label}
      for padding in ("edge", "zeros"):
        pairs.append(dict(epsilon=eps, model=model_name, padding=padding,
                          **paired_difference(
                              correct,
                              by_impl[f"fgr_tf flow_pgd padding={padding}"][2],
                              by_impl["original multi_step"][2])))
  return results, pairs


# --------------------------------------------------------------------------
# Reference side (the PyTorch virtualenv; no TensorFlow, no fgr_tf).


def torch_small_cnn(weights):
  """The small CNN as a torch.nn.Module (NCHW input), from the npz weights."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  t = lambda key: torch.from_numpy(np.asarray(weights[key], np.float32))

  class SmallCNN(nn.Module):

    def __init__(self):
      super().__init__()
      layers = []
      for i in range(2):
        kernel = t(f"conv{i}/kernel")  # HWIO -> OIHW
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
        conv.weight.data = kernel.permute(3, 2, 0, 1).contiguous()
        conv.bias.data = t(f"conv{i}/bias")
        bn = nn.BatchNorm2d(kernel.shape[3],
                            eps=float(weights[f"bn{i}/epsilon"]))
        bn.weight.data, bn.bias.data = t(f"bn{i}/gamma"), t(f"bn{i}/beta")
        bn.running_mean.data = t(f"bn{i}/moving_mean")
        bn.running_var.data = t(f"bn{i}/moving_variance")
        layers += [conv, bn, nn.ReLU(), nn.MaxPool2d(2, 2)]
      self.features = nn.Sequential(*layers)
      self.fc = nn.Linear(*weights["fc/kernel"].shape)
      self.fc.weight.data = t("fc/kernel").T.contiguous()
      self.fc.bias.data = t("fc/bias")
      self.dense = nn.Linear(*weights["dense/kernel"].shape)
      self.dense.weight.data = t("dense/kernel").T.contiguous()
      self.dense.bias.data = t("dense/bias")

    def forward(self, x):
      x = self.features(x)
      x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
      return self.dense(torch.relu(self.fc(x)))

  model = SmallCNN().eval()
  for p in model.parameters():
    p.requires_grad_(False)
  return model


def _original_flow_pgd(model, x, y, settings, original_dir, batch):
  """The original's multi_step, imported as is; its final grid is read by
  wrapping the module's `F` (torch.nn.functional) to record grid_sample's
  grid, so the T-norm can be computed."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, original_dir)
  from attacks import gradient  # pylint: disable=g-import-not-at-top

  class RecordingFunctional:
    last_grid = None

    def __getattr__(self, name):
      return getattr(F, name)

    def grid_sample(self, image, grid, *args, **kwargs):
      RecordingFunctional.last_grid = grid.detach()
      return F.grid_sample(image, grid, *args, **kwargs)

  gradient.F = RecordingFunctional()
  advs, flows = [], []
  height, width = x.shape[2:]
  for i in range(0, len(x), batch):
    xb, yb = x[i:i + batch], y[i:i + batch]
    advs.append(gradient.multi_step(model, xb, yb, **settings))
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).repeat(len(xb), 1, 1)
    identity = F.affine_grid(theta, xb.shape, align_corners=True)
    flows.append(RecordingFunctional.last_grid - identity)
  flow = torch.cat(flows).numpy()  # normalized, (x, y), align_corners=True
  pixels = np.stack([flow[..., 0] * (width - 1) / 2,
                     flow[..., 1] * (height - 1) / 2], -1)
  return torch.cat(advs), np.linalg.norm(pixels, axis=-1).max(axis=(1, 2))


def _shim_torch_for_advertorch():
  """advertorch 0.2.3 imports torch.autograd.gradcheck.zero_gradients,
  removed in torch 2.x, and `from torchvision import transforms` (only for
  its JPEG defense): a stand-in module avoids installing torchvision, whose
  wheels pin their own torch."""
  import importlib  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:
    importlib.import_module("torchvision")
  except ImportError:
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")

    class Unavailable:  # advertorch.functional makes one of each at import

      def __call__(self, *args):
        raise RuntimeError("torchvision is not installed (stand-in)")

    stub.transforms.ToPILImage = stub.transforms.ToTensor = Unavailable
    sys.modules["torchvision"] = stub
    sys.modules["torchvision.transforms"] = stub.transforms
  # The module (torch.autograd.gradcheck is also a function's name).
  gradcheck = importlib.import_module("torch.autograd.gradcheck")
  if not hasattr(gradcheck, "zero_gradients"):
    def zero_gradients(x):
      if isinstance(x, torch.Tensor):
        if x.grad is not None:
          x.grad.detach_()
          x.grad.zero_()
      else:
        for element in x:
          zero_gradients(element)
    gradcheck.zero_gradients = zero_gradients


def _advertorch_stadv(model, x, y, settings, batch):
  """advertorch's SpatialTransformAttack with its defaults, `batch` images
  per L-BFGS-B problem (its loss sums over the batch). The final grid is
  read by wrapping scipy's fmin_l_bfgs_b (imported inside perturb)."""
  import warnings  # pylint: disable=g-import-not-at-top
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  _shim_torch_for_advertorch()
  from advertorch.attacks import SpatialTransformAttack  # pylint: disable=g-import-not-at-top
  warnings.filterwarnings("ignore", message=".*align_corners.*")
  real = scipy.optimize.fmin_l_bfgs_b
  record = {}

  def recording_lbfgs(*args, **kwargs):
    out = real(*args, **kwargs)
    record["grid"], record["nit"] = out[0], out[2]["nit"]
    return out

  scipy.optimize.fmin_l_bfgs_b = recording_lbfgs
  attack = SpatialTransformAttack(model, num_classes=10, **settings)
  advs, t_norms = [], []
  height, width = x.shape[2:]
  try:
    for i in range(0, len(x), batch):
      xb, yb = x[i:i + batch], y[i:i + batch]
      final = attack.perturb(xb, yb)
      grid = torch.from_numpy(record["grid"]).float().reshape(
          len(xb), height, width, 2)
      theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).repeat(len(xb), 1, 1)
      identity = F.affine_grid(theta, xb.shape)
      adv = F.grid_sample(xb, grid)  # what perturb returns when successful
      fooled = model(adv).argmax(1) != yb
      assert torch.equal(final[fooled], adv[fooled])
      delta = (grid - identity).numpy()  # align_corners=False units
      pixels = np.stack([delta[..., 0] * width / 2,
                         delta[..., 1] * height / 2], -1)
      advs.append(adv)
      t_norms.append(np.linalg.norm(pixels, axis=-1).max(axis=(1, 2)))
  finally:
    scipy.optimize.fmin_l_bfgs_b = real
  return torch.cat(advs), np.concatenate(t_norms)


def _shim_collections_for_foolbox():
  """foolbox 2.4 imports collections.Iterable etc. (moved to
  collections.abc; removed from collections in Python 3.10)."""
  import collections  # pylint: disable=g-import-not-at-top
  import collections.abc  # pylint: disable=g-import-not-at-top
  for name in ("Iterable", "Mapping", "MutableMapping", "Sequence",
               "Callable"):
    if not hasattr(collections, name):
      setattr(collections, name, getattr(collections.abc, name))


def _foolbox_adef(model, x, y, settings, batch):
  """foolbox 2.4's ADefAttack (foolbox batches the images itself). Each
  image gets its own attack instance, whose `vector_field` (pixels, (x, y))
  is the final deformation; a subclass only records the instances."""
  import torch  # pylint: disable=g-import-not-at-top
  _shim_collections_for_foolbox()
  import foolbox  # pylint: disable=g-import-not-at-top

  class RecordingADef(foolbox.attacks.ADefAttack):
    instances = []

    def _initialize(self):
      super()._initialize()
      RecordingADef.instances.append(self)

  fmodel = foolbox.models.PyTorchModel(model, bounds=(0, 1), num_classes=10,
                                       channel_axis=1)
  attack = RecordingADef(fmodel)
  advs, t_norms = [], []
  for i in range(0, len(x), batch):
    xb, yb = x[i:i + batch].numpy(), y[i:i + batch].numpy()
    RecordingADef.instances.clear()
    results = attack(xb, yb, unpack=False, **settings)
    assert len(RecordingADef.instances) == len(xb)
    for adversarial, instance, image in zip(results, RecordingADef.instances,
                                            xb):
      field = instance.vector_field
      t_norms.append(0.0 if field is None else
                     float(np.linalg.norm(field, axis=-1).max()))
      advs.append(image if adversarial.perturbed is None else
                  adversarial.perturbed)
  return torch.from_numpy(np.stack(advs)), np.asarray(t_norms)


def art_rigid_t_norm(height, width, trans_rows, trans_cols, angle_deg):
  """T-norm (pixels) of ART's transform: scipy.ndimage.shift by (rows,
  cols) then rotate(reshape=False) about the centre c, i.e.
  out[p] = x[M (p - c) + c - t] with M = [[cos, sin], [-sin, cos]]."""
  a = math.radians(angle_deg)
  m = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  centre = np.array([(height - 1) / 2, (width - 1) / 2])
  p = np.stack([ys, xs], -1).reshape(-1, 2) - centre
  displacement = p @ (m - np.eye(2)).T - np.array([trans_rows, trans_cols])
  return float(np.linalg.norm(displacement, axis=-1).max())


def art_grid(height, width, max_translation, num_translations, max_rotation,
             num_rotations):
  """ART's grid, in its search order: SpatialTransformation.generate rounds
  the translations to whole pixels, drops duplicates and sorts (on NHWC
  input: x.shape[1], x.shape[2] = height, width)."""
  def pixels(size):
    largest = int(round(size * max_translation / 100.0))
    return sorted({int(round(g)) for g in np.linspace(
        -largest, largest, num=num_translations)})

  rotations = sorted(set(np.linspace(-max_rotation, max_rotation,
                                     num=num_rotations)))
  return [(tx, ty, rot) for tx in pixels(height) for ty in pixels(width)
          for rot in rotations]


def _art_grid(model, x, y, settings, check):
  """ART's SpatialTransformation as a per-image worst-of-grid attack.

  For a batch, ART picks ONE transform for all images (the highest fooling
  rate) and reuses it in later `generate` calls, so per-image worst-of-k
  means one fresh attack per image: ~3 s per image here (scipy's spline
  shift + rotate of one image, 775 times). This runs the same search batched:
  ART's grid and order, ART's own `_perturb` on the whole batch for each
  transform, and per image the first transform that changes the model's
  prediction (what `generate` keeps for one image; none: the clean image,
  transform (0, 0, 0)). The first `check` images are also attacked with
  `generate` one by one, and must give the same transform and image.

  The model sees NHWC arrays (channels_first=False): on NCHW input ART
  computes the row shift from x.shape[1], the channel count, which leaves
  no vertical translation.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from art.attacks.evasion import SpatialTransformation  # pylint: disable=g-import-not-at-top
  from art.estimators.classification import PyTorchClassifier  # pylint: disable=g-import-not-at-top
  del y  # ART attacks the model's own prediction

  class NHWC(torch.nn.Module):

    def __init__(self, model):
      super().__init__()
      self.model = model

    def forward(self, images):
      return self.model(images.permute(0, 3, 1, 2))

  images = x.numpy().transpose(0, 2, 3, 1).copy()
  height, width = images.shape[1:3]
  classifier = PyTorchClassifier(
      model=NHWC(model), loss=torch.nn.CrossEntropyLoss(),
      input_shape=images.shape[1:], nb_classes=10, clip_values=(0.0, 1.0),
      channels_first=False, device_type="cpu")
  attack = SpatialTransformation(classifier, verbose=False, **settings)
  predict = lambda batch: np.argmax(classifier.predict(batch, batch_size=256),
                                    axis=1)
  clean = predict(images)
  adv = images.copy()
  params = np.zeros((len(images), 3))
  done = np.zeros(len(images), bool)
  for tx, ty, rot in art_grid(height, width, **settings):
    todo = np.flatnonzero(~done)
    if not todo.size:
      break
    candidate = attack._perturb(images[todo], tx, ty, rot)  # pylint: disable=protected-access
    fooled = predict(candidate) != clean[todo]
    adv[todo[fooled]] = candidate[fooled]
    params[todo[fooled]] = (tx, ty, rot)
    done[todo[fooled]] = True
  for i in range(min(check, len(images))):
    single = SpatialTransformation(classifier, verbose=False, **settings)
    single_adv = single.generate(images[i:i + 1])[0]
    assert (single.attack_trans_x, single.attack_trans_y,
            single.attack_rot) == tuple(params[i]), (i, params[i])
    np.testing.assert_allclose(single_adv, adv[i], atol=1e-6)
  t_norms = [art_rigid_t_norm(height, width, *p) for p in params]
  return torch.from_numpy(adv.transpose(0, 3, 1, 2).copy()), np.asarray(
      t_norms)


def run_reference(args):
  """The reference side: loads the npz, checks the logits, runs the rows."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  with np.load(args.input) as f:
    data = {k: f[k] for k in f.files}
  weights = {k: v for k, v in data.items() if "/" in k}
  model = torch_small_cnn(weights)
  x = torch.from_numpy(data["images"].transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(data["labels"].astype(np.int64))
  with torch.no_grad():
    logits = model(x).numpy()
  difference = float(np.abs(logits - data["keras_logits"]).max())
  scale = float(np.abs(data["keras_logits"]).max())
  if difference > 1e-5 * max(1.0, scale):
    raise SystemExit(f"PyTorch and Keras logits differ by {difference} "
                     f"(largest logit {scale}): the conversion is wrong.")
  out = {"max_logit_difference": np.float64(difference),
         "clean_pred": logits.argmax(-1)}
  for index, attack, impl, settings in json.loads(str(data["rows"])):
    start = time.perf_counter()
    if impl.startswith("original"):
      adv, t_norm = _original_flow_pgd(model, x, y, settings,
                                       args.original_dir, args.batch)
    elif impl.startswith("advertorch"):
      adv, t_norm = _advertorch_stadv(model, x, y, settings,
                                      args.stadv_batch)
    elif impl.startswith("foolbox"):
      adv, t_norm = _foolbox_adef(model, x, y, settings, args.batch)
    elif impl.startswith("ART"):
      adv, t_norm = _art_grid(model, x, y, settings, args.art_check)
    else:
      raise ValueError(f"Unknown reference {impl!r}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
      adv_pred = model(adv.float()).argmax(1).numpy()
    out[f"{index}/adv_pred"] = adv_pred
    out[f"{index}/success"] = adv_pred != data["labels"]
    out[f"{index}/t_norm"] = np.asarray(t_norm, np.float64)
    out[f"{index}/seconds"] = np.float64(seconds)
    print(f"  {attack} / {impl}: {seconds:.1f} s", flush=True)
  np.savez(args.output, **out)


# --------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference_python",
                      default="/work/venvs/reference/bin/python",
                      help="Python of the reference virtualenv (torch, "
                      "advertorch, foolbox, ART).")
  parser.add_argument("--original_dir", default=None,
                      help="A checkout of xpf/Flow-Gradient-Regularization.")
  parser.add_argument("--workdirs",
                      default="runs/demo/baseline,runs/demo/fgr100",
                      help="Training workdirs (small_cnn), comma-separated.")
  parser.add_argument("--checkpoint", default="best",
                      choices=["best", "final"])
  parser.add_argument("--num_images", type=int, default=500,
                      help="The first N Fashion-MNIST test images.")
  parser.add_argument("--attacks", default=",".join(ATTACKS))
  parser.add_argument("--epsilons", default="0.01,0.02,0.05",
                      help="flow-PGD budgets (normalized units).")
  parser.add_argument("--batch", type=int, default=250)
  parser.add_argument("--stadv_batch", type=int, default=1,
                      help="Images per advertorch L-BFGS-B problem.")
  parser.add_argument("--art_check", type=int, default=10,
                      help="Images also attacked by ART's generate one by "
                      "one, to check the batched search.")
  parser.add_argument("--threads", type=int, default=1,
                      help="torch.set_num_threads on the reference side (1: "
                      "with 2 on this shared 2-core machine, a one-image "
                      "forward took 44 ms instead of 0.5 ms).")
  parser.add_argument("--output_dir", default="runs/reference_attacks")
  parser.add_argument("--tables_from", default=None,
                      help="Only print the tables of results.json files "
                      "(comma-separated; merged).")
  parser.add_argument("--side", default="tf", choices=["tf", "reference"],
                      help=argparse.SUPPRESS)
  parser.add_argument("--input", help=argparse.SUPPRESS)
  parser.add_argument("--output", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def merge_results(paths):
  """One results dict from several results.json (e.g. a run of stAdv alone
  and one of the other attacks on the same images); rows grouped by model."""
  merged = {"num_images": set(), "rows": [], "flow_pgd_paired": []}
  for path in paths:
    with open(path) as f:
      saved = json.load(f)
    merged["num_images"].add(saved["num_images"])
    merged["rows"] += saved["rows"]
    merged["flow_pgd_paired"] += saved["flow_pgd_paired"]
  if len(merged["num_images"]) != 1:
    raise SystemExit(f"Results on different numbers of images: "
                     f"{sorted(merged['num_images'])}")
  models = list(dict.fromkeys(r["model"] for r in merged["rows"]))
  merged["rows"].sort(key=lambda r: models.index(r["model"]))
  merged["num_images"] = merged["num_images"].pop()
  return merged


def print_tables(saved):
  print(format_table(saved["rows"]))
  if saved["flow_pgd_paired"]:
    print()
    print(format_paired(saved["flow_pgd_paired"]))
  t_norm_pairs = paired_t_norms(saved["rows"])
  if t_norm_pairs:
    print()
    print(format_paired_t_norms(t_norm_pairs))


def main(argv=None):
  args = parse_args(argv)
  if args.side == "reference":
    run_reference(args)
    return
  if args.tables_from:
    print_tables(merge_results(args.tables_from.split(",")))
    return
  results, pairs = run(args)
  saved = {"num_images": args.num_images, "rows": results,
           "flow_pgd_paired": pairs}
  with open(os.path.join(args.output_dir, "results.json"), "w") as f:
    json.dump(saved, f)
  print_tables(saved)


if __name__ == "__main__":
  main()
