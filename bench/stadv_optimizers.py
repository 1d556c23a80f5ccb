"""stAdv with Adam vs L-BFGS on the same images of the same trained models.

  python -m bench.stadv_optimizers \\
      [--workdirs=runs/demo_t/baseline,runs/demo_t/fgr100] \\
      [--num_images=500] [--runs=adam:200,lbfgs:100,lbfgs:300]

Attacks the first --num_images Fashion-MNIST test images of each model
(`<workdir>/<checkpoint>.keras`, e.g. the quickstart's) with
`fgr_tf.attacks.stadv` once per --runs entry, `optimizer:steps` (Adam
steps or L-BFGS iterations per search round), all other settings equal
(--tau, --search_steps, --batch). Each run is warmed up on the first batch
(tracing, untimed), then timed over all images.

Prints one Markdown table per model and run: success rate (on the
correctly classified images), mean and median T-norm (pixels, the largest
per-pixel displacement; over the successful attacks), mean iterations
(`AttackResult.iterations` of the successes) and seconds per image; then,
for every run against the first one, on the correctly classified images
BOTH fooled: their number, the median T-norm and mean L_flow (stAdv's
smoothness loss, what the attack minimizes) of each, and the share of
images where the run's T-norm is smaller. Writes everything, per image
too, to --output (JSON). docs/ATTACK_REFERENCES.md has the measured
numbers.
"""

import argparse
import json
import os
import time

import numpy as np

from bench import reference_attacks


def parse_runs(text):
  """"adam:200,lbfgs:100" -> [("adam", 200), ("lbfgs", 100)]."""
  runs = []
  for item in text.split(","):
    optimizer, _, steps = item.partition(":")
    if optimizer not in ("adam", "lbfgs") or not steps.isdigit():
      raise SystemExit(f"--runs entries are optimizer:steps with optimizer "
                       f"adam or lbfgs. Received: {item!r}")
    runs.append((optimizer, int(steps)))
  return runs


def attack_all(backbone, images, labels, settings, batch):
  """stadv over all images in batches after an untimed warm-up on the first
  batch; per-image success, T-norm (px), L_flow, iterations, and seconds."""
  from fgr_tf import attacks  # pylint: disable=g-import-not-at-top
  attacks.stadv(backbone, images[:batch], labels[:batch], **settings)
  out = {k: [] for k in ("success", "t_norm", "smoothness", "iterations")}
  start = time.perf_counter()
  for i in range(0, len(images), batch):
    result = attacks.stadv(backbone, images[i:i + batch],
                           labels[i:i + batch], **settings)
    out["success"].append(result.success.numpy())
    out["t_norm"].append(result.t_norm.numpy())
    out["smoothness"].append(attacks.flow_smoothness(result.flow).numpy())
    out["iterations"].append(result.iterations.numpy())
  seconds = time.perf_counter() - start
  return {k: np.concatenate(v) for k, v in out.items()}, seconds


def paired(correct, first, other):
  """`other` against `first` on the correctly classified images both
  fooled."""
  both = first["success"] & other["success"] & correct
  if not both.any():
    return dict(both=0)
  return dict(
      both=int(both.sum()),
      median_t_first=float(np.median(first["t_norm"][both])),
      median_t_other=float(np.median(other["t_norm"][both])),
      mean_t_first=float(np.mean(first["t_norm"][both])),
      mean_t_other=float(np.mean(other["t_norm"][both])),
      mean_smoothness_first=float(np.mean(first["smoothness"][both])),
      mean_smoothness_other=float(np.mean(other["smoothness"][both])),
      other_smaller=float(np.mean(other["t_norm"][both] <
                                  first["t_norm"][both])))


def format_tables(rows, pairs):
  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  lines = ["| model | optimizer | steps | success | mean T-norm (px) | "
           "median T-norm (px) | mean iterations | s/image |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['optimizer']} | {r['steps']} | "
        f"{fmt(r['success_rate'], '.3f')} | {fmt(r['mean_t_norm'], '.3f')} "
        f"| {fmt(r['median_t_norm'], '.3f')} | "
        f"{fmt(r['mean_iterations'], '.1f')} | "
        f"{r['seconds_per_image']:.4f} |")
  lines += ["", "| model | first | other | both fooled | median T first | "
            "median T other | mean T first | mean T other | mean L_flow "
            "first | mean L_flow other | other smaller |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for p in pairs:
    if not p["both"]:
      lines.append(f"| {p['model']} | {p['first']} | {p['other']} | 0 |"
                   + " n/a |" * 7)
      continue
    lines.append(
        f"| {p['model']} | {p['first']} | {p['other']} | {p['both']} | "
        f"{p['median_t_first']:.3f} | {p['median_t_other']:.3f} | "
        f"{p['mean_t_first']:.3f} | {p['mean_t_other']:.3f} | "
        f"{p['mean_smoothness_first']:.2f} | "
        f"{p['mean_smoothness_other']:.2f} | {p['other_smaller']:.2f} |")
  return "\n".join(lines)


def run(args):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from fgr_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  runs = parse_runs(args.runs)
  images, labels = data_lib.load("fashion_mnist", "test",
                                 num_examples=args.num_images)
  images = data_lib.to_unit_float(images).numpy()
  labels = np.asarray(labels, np.int32)
  rows, pairs = [], []
  for workdir in args.workdirs.split(","):
    model_name = os.path.basename(os.path.normpath(workdir))
    # pylint: disable-next=protected-access
    backbone = reference_attacks._load(workdir, args.checkpoint)
    logits = backbone.predict(images, batch_size=args.batch, verbose=0)
    correct = np.argmax(logits, -1) == labels
    print(f"{model_name}: clean accuracy {correct.mean():.3f} on "
          f"{len(images)} images", flush=True)
    per_run = []
    for optimizer, steps in runs:
      settings = dict(tau=args.tau, steps=steps,
                      search_steps=args.search_steps, optimizer=optimizer)
      out, seconds = attack_all(backbone, images, labels, settings,
                                args.batch)
      summary = reference_attacks.summarize(
          correct, out["success"], out["t_norm"],
          np.zeros(len(images), bool), seconds)
      hit = out["success"] & correct
      row = dict(model=model_name, optimizer=optimizer, steps=steps,
                 settings=settings,
                 success_rate=summary["success_rate"],
                 mean_t_norm=summary["mean_t_norm"],
                 median_t_norm=summary["median_t_norm"],
                 mean_iterations=(float(out["iterations"][hit].mean())
                                  if hit.any() else None),
                 seconds_per_image=summary["seconds_per_image"],
                 correct=correct.tolist(),
                 per_image={k: (v.round(5) if v.dtype.kind == "f" else
                                v).tolist() for k, v in out.items()})
      rows.append(row)
      per_run.append((f"{optimizer}:{steps}", out))
      print(f"  {optimizer}:{steps}: {seconds:.1f} s", flush=True)
    first_name, first = per_run[0]
    for name, other in per_run[1:]:
      pairs.append(dict(model=model_name, first=first_name, other=name,
                        **paired(correct, first, other)))
  return rows, pairs


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs",
                      default="runs/demo_t/baseline,runs/demo_t/fgr100")
  parser.add_argument("--checkpoint", default="best")
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--runs", default="adam:200,lbfgs:100,lbfgs:300",
                      help="optimizer:steps, comma-separated; the first is "
                      "the one the others are paired with")
  parser.add_argument("--tau", type=float, default=0.05)
  parser.add_argument("--search_steps", type=int, default=3)
  parser.add_argument("--batch", type=int, default=250)
  parser.add_argument("--output",
                      default="runs/stadv_optimizers/results.json")
  args = parser.parse_args(argv)
  rows, pairs = run(args)
  os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(dict(rows=rows, pairs=pairs, args=vars(args)), f)
  print(format_tables(rows, pairs))


if __name__ == "__main__":
  main()
