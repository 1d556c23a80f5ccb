"""Robustness evaluation: clean and adversarial accuracy per attack."""

import json
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from fgr_tf import attacks as attacks_lib
from fgr_tf import errors
from fgr_tf import files
from fgr_tf import validation


def resolve_attacks(attacks):
  """Normalizes `attacks` to {name: callable(model, images, labels)}.

  Accepts a list of attack names (default settings), a dict name -> dict of
  settings (e.g. {"flow_pgd": {"epsilon": 0.01, "steps": 100}}), or a dict
  name -> callable returning an `AttackResult`. Names of settings dicts
  may carry a suffix after '@' to run one attack with several budgets
  ("flow_pgd@0.02": {...} runs `flow_pgd`).
  """
  if isinstance(attacks, (list, tuple)):
    attacks = {name: {} for name in attacks}
  resolved = {}
  for name, spec in attacks.items():
    if callable(spec):
      resolved[name] = spec
      continue
    fn = attacks_lib.get(name.split("@")[0])
    settings = dict(spec)
    resolved[name] = (lambda fn, settings: lambda model, images, labels: fn(
        model, images, labels, **settings))(fn, settings)
  return resolved


def _batches(data, batch_size):
  if isinstance(data, tf.data.Dataset):
    for images, labels in data:
      yield images, labels
    return
  images, labels = data
  for start in range(0, len(images), batch_size):
    yield (images[start:start + batch_size], labels[start:start + batch_size])


def evaluate(model, data, attacks, batch_size=256, max_examples=None):
  """Clean accuracy and, per attack, adversarial accuracy and flow norms.

  Args:
    model: classifier returning logits (an `FGRModel` or a backbone); run in
      inference mode, its variables are never changed.
    data: a tf.data.Dataset of (images, labels) batches, or a tuple
      (images [N, H, W, C] floats in [0, 1], labels [N] ints).
    attacks: see `resolve_attacks`.
    batch_size: batch size when `data` is a tuple.
    max_examples: stop after this many examples.

  Returns:
    A JSON-serializable dict: {"num_examples", "clean_accuracy",
    "attacks": {name: {"adversarial_accuracy", "success_rate" (on the
    correctly classified inputs), "mean_t_norm", "max_t_norm" (pixels, over
    successful attacks on correctly classified inputs; None if there are
    none), "mean_iterations", "seconds_per_image"}}}.
  """
  attack_fns = resolve_attacks(attacks)
  correct_all = []
  per_attack = {name: dict(adv_correct=[], success=[], t_norm=[],
                           iterations=[], seconds=0.0)
                for name in attack_fns}
  seen = 0
  channels, classes = validation.model_shape(model)
  from_dataset = isinstance(data, tf.data.Dataset)
  if not from_dataset:  # arrays: check them all once, up front
    images = validation.check_images(data[0], "evaluate", channels)
    data = (images, validation.check_labels(data[1], "evaluate", classes,
                                            batch=images.shape[0]))
  for images, labels in _batches(data, batch_size):
    if max_examples is not None:
      images, labels = images[:max_examples - seen], labels[:max_examples -
                                                           seen]
    if len(images) == 0:
      break
    if from_dataset:
      images = validation.check_images(images, "evaluate", channels)
      labels = validation.check_labels(labels, "evaluate", classes,
                                       batch=images.shape[0])
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    logits = model(images, training=False)
    correct = (np.argmax(logits, -1) == labels.numpy())
    correct_all.append(correct)
    for name, fn in attack_fns.items():
      start = time.perf_counter()
      result = fn(model, images, labels)
      success = result.success.numpy()
      record = per_attack[name]
      record["seconds"] += time.perf_counter() - start
      record["adv_correct"].append(
          np.argmax(result.adv_logits, -1) == labels.numpy())
      record["success"].append(success)
      record["t_norm"].append(result.t_norm.numpy())
      record["iterations"].append(result.iterations.numpy())
      logging.info("%s: %d images attacked, %.2f s/image so far", name,
                   seen + len(images), record["seconds"] / (seen + len(images)))
    seen += len(images)
    if max_examples is not None and seen >= max_examples:
      break
  if not seen:
    raise errors.UserError("evaluate received no examples.")
  correct = np.concatenate(correct_all)
  results = {"num_examples": int(seen),
             "clean_accuracy": float(correct.mean()), "attacks": {}}
  for name, record in per_attack.items():
    success = np.concatenate(record["success"]) & correct
    t_norm = np.concatenate(record["t_norm"])[success]
    results["attacks"][name] = {
        # A misclassified clean input counts as not robust.
        "adversarial_accuracy": float(
            (np.concatenate(record["adv_correct"]) & correct).mean()),
        "success_rate": (float(success.sum() / correct.sum())
                         if correct.any() else None),
        "mean_t_norm": float(t_norm.mean()) if t_norm.size else None,
        "max_t_norm": float(t_norm.max()) if t_norm.size else None,
        "mean_iterations": float(np.concatenate(
            record["iterations"])[correct].mean()) if correct.any() else None,
        "seconds_per_image": record["seconds"] / seen,
    }
  return results


def format_table(results_by_model):
  """Markdown table: one row per (model, attack) from `evaluate` results."""
  lines = ["| model | attack | clean acc | adv acc | success | mean T-norm "
           "(px) | s/image |", "|---|---|---|---|---|---|---|"]
  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  for model_name, results in results_by_model.items():
    for attack, r in results["attacks"].items():
      lines.append(
          f"| {model_name} | {attack} | {results['clean_accuracy']:.3f} | "
          f"{r['adversarial_accuracy']:.3f} | {fmt(r['success_rate'], '.3f')}"
          f" | {fmt(r['mean_t_norm'], '.3f')} | "
          f"{r['seconds_per_image']:.4f} |")
  return "\n".join(lines)


def attacks_from_config(eval_config):
  """{name: settings} from a config's `eval` section (incl. budget curve)."""
  specs = {name: dict(settings) for name, settings in
           eval_config.attacks.items()}
  base = specs.get("flow_pgd", {"steps": 100})
  for epsilon in eval_config.flow_pgd_budgets:
    specs[f"flow_pgd@{epsilon:g}"] = dict(base, epsilon=float(epsilon))
  return specs


def evaluate_workdir(config, workdir, checkpoint="best", output=None,
                     write=True):
  """Evaluates `workdir/<checkpoint>.keras` on the test split; writes JSON.

  Args:
    config: the experiment's ConfigDict (data and eval sections).
    workdir: a training workdir.
    checkpoint: "best" or "final".
    output: results path; default `workdir/results.json`.
    write: False returns the results without writing them (for a caller
      that adds to them and writes once, like `fgr_tf.sweep`).

  Returns:
    The `evaluate` dict, plus "checkpoint" and "config" keys.
  """
  from fgr_tf import data as data_lib  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  if checkpoint not in ("best", "final"):
    raise errors.UserError(f"checkpoint must be 'best' or 'final'. Received: "
                           f"{checkpoint!r}")
  path = os.path.join(workdir, f"{checkpoint}.keras")
  if not os.path.exists(path):
    raise errors.DataNotFoundError(f"No checkpoint {path}: train first "
                                   "(fgr-train --config=... --workdir=...).")
  model = keras.saving.load_model(path)
  images, labels = data_lib.load(
      config.data.name, "test", source=config.data.source or None,
      data_dir=config.data.data_dir or None,
      num_examples=config.eval.num_examples)
  results = evaluate(model, (data_lib.to_unit_float(images).numpy(), labels),
                     attacks_from_config(config.eval),
                     batch_size=config.eval.batch_size)
  results["checkpoint"] = path
  results["fgr_lambda"] = getattr(model, "fgr_lambda", None)
  results["config"] = json.loads(config.to_json_best_effort())
  if write:
    files.write_json(results,
                     output or os.path.join(workdir, "results.json"))
  return results
