"""The original's steps in PyTorch, for a same-machine speed comparison.

  pip install torch==2.13.0 numpy      # in a separate environment
  python bench/torch_original.py --batch 128 --repeats 8 --threads 2

A faithful re-statement of the PyTorch original's code paths (SPEC §1):
kuangliu-style CIFAR VGG-11 with BatchNorm; the flow warp as
`grid_sample(x, affine_grid(identity) + flow, align_corners=True)`; the FGR
step (random start, zero flow with requires_grad, CE with mean reduction,
`autograd.grad(..., create_graph=True)`, squared-gradient penalty, SGD with
momentum and weight decay); the multi-step flow attack (10 signed steps);
the eval forward. `--dtype bfloat16` runs every model forward under
`torch.autocast("cpu", torch.bfloat16)` (what a PyTorch user does for
bf16 on CPU), to compare with fgr_tf's `mixed_bfloat16`.
`--original_dir=<checkout of xpf/Flow-Gradient-Regularization>` also times
the original's own code: its `models.build_model("vgg11")`, its training
loop's FGR step (`FlowGradientReg`: random start, `x.requires_grad_`, its
gather-based `grid_sample`) and its `attacks.gradient.multi_step` (which
also back-propagates into the weights every step). Prints one JSON line
{"images_per_s": {mode: images/s (median)}} (and "original_images_per_s"
with --original_dir). Not part
of the library or its tests (PyTorch is not a dependency); `bench.compare`
runs it beside `bench.steps`.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

CFG_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
  """The original's CIFAR VGG (conv3x3-BN-ReLU, max-pools, Linear head)."""

  def __init__(self, cfg=CFG_VGG11, num_classes=10):
    super().__init__()
    layers, channels = [], 3
    for v in cfg:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v),
                   nn.ReLU(inplace=True)]
        channels = v
    layers.append(nn.AvgPool2d(1, 1))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


def flow_st(images, flows):
  """Warps NCHW images by a normalized flow [B, 2, H, W] (x, y order)."""
  batch = images.shape[0]
  theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(batch, 2, 3)
  grid = F.affine_grid(theta, images.shape, align_corners=True)
  grid = grid + flows.permute(0, 2, 3, 1)
  return F.grid_sample(images, grid, align_corners=True)


def fgr_step(model, optimizer, x, y, lam, rs_sigma):
  if rs_sigma > 0:
    noise = torch.randn(x.shape[0], 2, *x.shape[2:]) * rs_sigma
    x = torch.clamp(flow_st(x, noise), 0, 1).detach()
  flow = torch.zeros(x.shape[0], 2, *x.shape[2:], requires_grad=True)
  loss = F.cross_entropy(model(flow_st(x, flow)), y)
  grad = torch.autograd.grad(loss, flow, create_graph=True)[0]
  reg = grad.pow(2).sum(dim=(1, 2, 3)).mean()
  optimizer.zero_grad()
  (loss + lam * reg).backward()
  optimizer.step()


def plain_step(model, optimizer, x, y):
  loss = F.cross_entropy(model(x), y)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()


def flow_attack(model, x, y, epsilon=0.01, steps=10):
  flow = torch.zeros(x.shape[0], 2, *x.shape[2:])
  for _ in range(steps):
    flow.requires_grad_(True)
    loss = F.cross_entropy(model(torch.clamp(flow_st(x, flow), 0, 1)), y)
    grad, = torch.autograd.grad(loss, flow)
    flow = torch.clamp(flow.detach() + epsilon / steps * grad.sign(),
                       -epsilon, epsilon)
  return torch.clamp(flow_st(x, flow), 0, 1)


def eval_forward(model, x):
  with torch.no_grad():
    return model(x)


def original_steps(original_dir, x, y, lam=300.0, rs_sigma=0.01):
  """{mode: (model, step)} running the original checkout's own code."""
  # The checkout's `attacks/` has no __init__.py: a namespace package, which
  # this script's directory's bench/attacks.py would shadow.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [original_dir] + [p for p in sys.path
                                  if os.path.abspath(p or ".") != here]
  from models import build_model  # pylint: disable=g-import-not-at-top
  from regularizers.fgr import FlowGradientReg  # pylint: disable=g-import-not-at-top
  from attacks.gradient import multi_step  # pylint: disable=g-import-not-at-top

  def make(mode):
    model = build_model("vgg11", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    regularizer = FlowGradientReg()

    def fgr():  # train.py's loop body with fgr_lamb > 0
      inputs = regularizer.random_start(x, rs_sigma)
      inputs.requires_grad_(True)
      inputs = regularizer(inputs)
      loss = criterion(model(inputs), y)
      loss = loss + lam * regularizer.calculate(loss)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()

    steps = {"plain": lambda: plain_step(model, optimizer, x, y),
             "fgr": fgr,
             "flow_pgd": lambda: multi_step(model, x, y, epsilon=0.01,
                                            iters=10),
             "eval": lambda: eval_forward(model, x)}
    if mode in ("flow_pgd", "eval"):
      model.eval()
    return steps[mode]

  return make


def time_step(step, warmup, repeats, precision):
  """Median seconds of `step` over `repeats` calls after `warmup`."""
  for _ in range(warmup):
    with precision():
      step()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    with precision():
      step()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--modes", default="plain,fgr,flow_pgd,eval")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--original_dir", default="",
                      help="A checkout of xpf/Flow-Gradient-Regularization.")
  args = parser.parse_args()
  if args.dtype == "bfloat16":
    precision = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
  else:
    precision = contextlib.nullcontext
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  x = torch.rand(args.batch, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch,))
  results = {}
  for mode in args.modes.split(","):
    model = VGG()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                weight_decay=5e-4)
    if mode in ("flow_pgd", "eval"):
      model.eval()
    step = {
        "plain": lambda: plain_step(model, optimizer, x, y),
        "fgr": lambda: fgr_step(model, optimizer, x, y, 300.0, 0.01),
        "flow_pgd": lambda: flow_attack(model, x, y),
        "eval": lambda: eval_forward(model, x),
    }[mode]
    results[mode] = args.batch / time_step(step, args.warmup, args.repeats,
                                           precision)
  output = {"torch": torch.__version__, "dtype": args.dtype,
            "images_per_s": results}
  if args.original_dir:
    make = original_steps(args.original_dir, x, y)
    output["original_images_per_s"] = {
        mode: args.batch / time_step(make(mode), args.warmup, args.repeats,
                                     precision)
        for mode in args.modes.split(",")}
  print(json.dumps(output))


if __name__ == "__main__":
  main()
