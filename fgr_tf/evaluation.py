"""Robustness evaluation: clean and adversarial accuracy per attack, and
the size of the deformations that minimal attacks need."""

import time

from absl import logging
import numpy as np
import tensorflow as tf

from fgr_tf import attacks as attacks_lib
from fgr_tf import errors
from fgr_tf import validation
from fgr_tf.backbones import folding

# Deformation budgets (T-norm, pixels) at which minimal attacks report
# robust accuracy.
BUDGETS_PX = (0.25, 0.5, 1.0)


def _batches(data, batch_size):
  if isinstance(data, tf.data.Dataset):
    for images, labels in data:
      yield images, labels
    return
  images, labels = data
  for start in range(0, len(images), batch_size):
    yield (images[start:start + batch_size], labels[start:start + batch_size])


def robust_accuracy_at(correct, success, t_norms, budget_px):
  """Robust accuracy of a minimal attack at a deformation budget.

  An image counts as robust if it is classified correctly and the attack
  either failed or needed a T-norm above `budget_px` (pixels).

  Args:
    correct: [N] bool, clean prediction correct.
    success: [N] bool, the attack fooled the model.
    t_norms: [N] float, T-norm of the deformation found (pixels).
    budget_px: float.
  """
  correct = np.asarray(correct, bool)
  needed_more = np.logical_or(~np.asarray(success, bool),
                              np.asarray(t_norms) > budget_px)
  return float(np.mean(correct & needed_more))


def _summary(attack, correct, record, seen, budgets_px):
  """The results entry of one attack (JSON-ready)."""
  success = np.concatenate(record["success"]) & correct
  # float64: a float32 mean of equal values can exceed their maximum.
  t_norms = np.concatenate(record["t_norm"]).astype(np.float64)
  found = t_norms[success]
  entry = attack.describe()
  entry.update({
      # A misclassified clean input counts as not robust.
      "adversarial_accuracy": float(
          (np.concatenate(record["adv_correct"]) & correct).mean()),
      "success_rate": (float(success.sum() / correct.sum())
                       if correct.any() else None),
      "mean_t_norm": float(found.mean()) if found.size else None,
      "median_t_norm": float(np.median(found)) if found.size else None,
      "max_t_norm": float(found.max()) if found.size else None,
      "mean_iterations": float(np.concatenate(
          record["iterations"])[correct].mean()) if correct.any() else None,
      "seconds_per_image": record["seconds"] / seen,
  })
  if attack.kind == "minimal":
    # Per image: the T-norm (px) of the deformation that fooled the model;
    # None where the clean image was wrong or the attack failed.
    entry["t_norms"] = [float(t) if s else None
                        for t, s in zip(t_norms, success)]
    entry["robust_accuracy_at_px"] = {
        f"{b:g}": robust_accuracy_at(correct, success, t_norms, b)
        for b in budgets_px}
  return entry


def evaluate(model, data, attacks, batch_size=256, max_examples=None,
             budgets_px=BUDGETS_PX):
  """Clean accuracy and, per attack, adversarial accuracy and flow norms.

  Args:
    model: classifier returning logits (an `FGRModel` or a backbone); run in
      inference mode, its variables are never changed.
    data: a tf.data.Dataset of (images, labels) batches, or a tuple
      (images [N, H, W, C] floats in [0, 1], labels [N] ints).
    attacks: `Attack`s or what `fgr_tf.attacks.resolve` takes (names, or
      label -> settings).
    batch_size: batch size when `data` is a tuple.
    max_examples: stop after this many examples.
    budgets_px: T-norm budgets (pixels) for minimal attacks' robust
      accuracy.

  Returns:
    A JSON-serializable dict: {"num_examples", "clean_accuracy",
    "correct" (per image: clean prediction right), "attacks": {label:
    {"attack", "kind", "settings", and "budget" for bounded attacks
    (`Attack.describe`), "adversarial_accuracy", "success_rate" (on the
    correctly classified inputs), "mean_t_norm", "median_t_norm",
    "max_t_norm" (pixels, over successful attacks on correctly classified
    inputs; None if there are none), "mean_iterations",
    "seconds_per_image", and for minimal attacks "t_norms" (per image) and
    "robust_accuracy_at_px"
    {budget: accuracy}}}}.
  """
  return _evaluate(model, data, attacks, batch_size, max_examples,
                   budgets_px, 0)[0]


def evaluate_with_gallery(model, data, attacks, gallery_size, batch_size=256,
                          max_examples=None, budgets_px=BUDGETS_PX):
  """`evaluate` and, from the same attack runs, the `gallery` dict of the
  first `gallery_size` images (no attack runs again: the pictures show
  what was scored).

  Returns:
    (results as `evaluate`, gallery as `gallery`, or None if gallery_size
    is 0).
  """
  return _evaluate(model, data, attacks, batch_size, max_examples,
                   budgets_px, gallery_size)


def _evaluate(model, data, attacks, batch_size, max_examples, budgets_px,
              gallery_size):
  """`evaluate`'s results and the gallery of its first `gallery_size`
  images (None if 0)."""
  attack_list = attacks_lib.resolve(attacks)
  shown = []
  correct_all = []
  per_attack = {a.label: dict(adv_correct=[], success=[], t_norm=[],
                              iterations=[], seconds=0.0)
                for a in attack_list}
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
    logits = folding.inference_function(model)(images)
    correct = (np.argmax(logits, -1) == labels.numpy())
    correct_all.append(correct)
    batch_results = {}
    for attack in attack_list:
      start = time.perf_counter()
      result = batch_results[attack.label] = attack(model, images, labels)
      success = result.success.numpy()
      record = per_attack[attack.label]
      record["seconds"] += time.perf_counter() - start
      record["adv_correct"].append(
          np.argmax(result.adv_logits, -1) == labels.numpy())
      record["success"].append(success)
      record["t_norm"].append(result.t_norm.numpy())
      record["iterations"].append(result.iterations.numpy())
      logging.info("%s: %d images attacked, %.3f s/image so far",
                   attack.label, seen + len(images),
                   record["seconds"] / (seen + len(images)))
    wanted = gallery_size - sum(len(part["images"]) for part in shown)
    if wanted > 0:
      shown.append(_shown(images, labels, logits, batch_results, wanted))
    seen += len(images)
    if max_examples is not None and seen >= max_examples:
      break
  if not seen:
    raise errors.UserError("evaluate received no examples.")
  correct = np.concatenate(correct_all)
  results = {"num_examples": int(seen),
             "clean_accuracy": float(correct.mean()),
             "correct": [bool(c) for c in correct],
             "attacks": {a.label: _summary(a, correct, per_attack[a.label],
                                           seen, budgets_px)
                         for a in attack_list}}
  if not shown:
    return results, None
  return results, {key: np.concatenate([part[key] for part in shown])
                   for key in shown[0]}


def gallery(model, images, labels, attacks):
  """What each attack does to a few images, for pictures.

  Args:
    model: classifier returning logits.
    images: [K, H, W, C] floats in [0, 1] (a few).
    labels: [K] ints.
    attacks: as `evaluate`.

  Returns:
    dict of NumPy arrays: "images", "labels", "predictions" (clean) and
    per attack label L: "L/adv_images", "L/flow" (pixels, dy dx),
    "L/predictions", "L/t_norm" (pixels), "L/success".
  """
  images = tf.cast(images, tf.float32)
  labels = tf.cast(labels, tf.int32)
  logits = folding.inference_function(model)(images)
  return _shown(images, labels, logits,
                {a.label: a(model, images, labels)
                 for a in attacks_lib.resolve(attacks)}, len(images))


def _shown(images, labels, logits, results, count):
  """The gallery dict of the first `count` images of a batch: its images,
  labels, clean `logits` and {label: `AttackResult`}."""
  out = {"images": np.asarray(images)[:count],
         "labels": np.asarray(labels)[:count],
         "predictions": np.argmax(logits, -1)[:count]}
  for label, result in results.items():
    out[f"{label}/adv_images"] = result.adv_images.numpy()[:count]
    out[f"{label}/flow"] = result.flow.numpy()[:count]
    out[f"{label}/predictions"] = np.argmax(result.adv_logits, -1)[:count]
    out[f"{label}/t_norm"] = result.t_norm.numpy()[:count]
    out[f"{label}/success"] = result.success.numpy()[:count]
  return out
