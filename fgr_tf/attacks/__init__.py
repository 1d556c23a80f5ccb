"""Deformation attacks, batched and compiled with tf.function.

Every attack is a function `(model, images, labels, **settings)` that runs
the model in inference mode without changing its variables and returns an
`AttackResult` (adversarial images, pixel flow, success, iterations, T-norm
in pixels). `make(name, **settings)` returns an `Attack`: the attack with
its settings, which knows its name, kind (bounded or minimal), whether it
can serve adversarial training, and describes itself for results files.

  attack = fgr_tf.attacks.make("flow_pgd", epsilon=0.02)
  result = attack(model, images, labels)
  attack.describe()  # {"attack": "flow_pgd", "kind": "bounded", ...}

Adding an attack: write `fgr_tf/attacks/<name>.py` with the function and
its `INFO = common.AttackInfo(...)`, and add one line to `REGISTRY`.
"""

import inspect

from fgr_tf import errors
from fgr_tf.attacks import adef as adef_lib
from fgr_tf.attacks import common
from fgr_tf.attacks import flow_pgd as flow_pgd_lib
from fgr_tf.attacks import random_flow as random_flow_lib
from fgr_tf.attacks import stadv as stadv_lib
from fgr_tf.attacks import worst_of_k as worst_of_k_lib
from fgr_tf.attacks.adef import adef
from fgr_tf.attacks.common import AttackResult
from fgr_tf.attacks.flow_pgd import flow_pgd
from fgr_tf.attacks.random_flow import random_flow
from fgr_tf.attacks.stadv import flow_smoothness
from fgr_tf.attacks.stadv import stadv
from fgr_tf.attacks.worst_of_k import worst_of_k

REGISTRY = {
    "flow_pgd": flow_pgd_lib.INFO,
    "stadv": stadv_lib.INFO,
    "adef": adef_lib.INFO,
    "worst_of_k": worst_of_k_lib.INFO,
    "random_flow": random_flow_lib.INFO,
}

# Settings that are not part of what an attack IS (results, labels).
_RUNTIME_SETTINGS = ("jit_compile", "target")


def _info(name):
  if name not in REGISTRY:
    raise errors.UserError(f"Unknown attack {name!r}. Expected one of "
                           f"{sorted(REGISTRY)}.")
  return REGISTRY[name]


def defaults(name):
  """{setting: default} of the attack called `name`."""
  parameters = inspect.signature(_info(name).function).parameters
  return {k: p.default for k, p in list(parameters.items())[3:]}


class Attack:
  """An attack with its settings (use `make`).

  Attributes:
    name: registry name, e.g. "flow_pgd".
    label: the name results use (default `name`; e.g. "flow_pgd@0.02" for
      a second budget).
    kind: "bounded" or "minimal" (`common.AttackInfo`).
    trains: whether it can serve adversarial training.
    settings: every setting, defaults filled in (JSON-ready).
    budget: the setting that is the budget of a bounded attack, or None.
  """

  def __init__(self, name, label=None, **settings):
    info = _info(name)
    known = defaults(name)
    unknown = sorted(set(settings) - set(known))
    if unknown:
      raise errors.UserError(
          f"Unknown setting(s) {unknown} for attack {name!r}. Expected some "
          f"of {sorted(known)}.")
    self.name = name
    self.label = label or name
    self.kind = info.kind
    self.trains = info.trains
    self.budget = info.budget
    self.budget_unit = info.budget_unit
    self._function = info.function
    self.settings = dict(known, **settings)

  def __call__(self, model, images, labels, **overrides):
    """Runs the attack; `overrides` replace settings for this call (e.g. a
    per-step `seed`). Returns an `AttackResult`."""
    return self._function(model, images, labels,
                          **dict(self.settings, **overrides))

  def replace(self, label=None, **settings):
    """A copy with some settings (and the label) changed."""
    current = {k: v for k, v in self.settings.items()}
    return Attack(self.name, label or self.label, **dict(current, **settings))

  def describe(self):
    """What results files record: {"attack", "kind", "settings"} and, for a
    bounded attack, "budget": {"name", "value", "unit"}."""
    settings = {k: v for k, v in self.settings.items()
                if k not in _RUNTIME_SETTINGS}
    described = {"attack": self.name, "kind": self.kind,
                 "settings": settings}
    if self.budget:
      described["budget"] = {"name": self.budget,
                             "value": self.settings[self.budget],
                             "unit": self.budget_unit}
    return described

  def __repr__(self):
    changed = {k: v for k, v in self.settings.items()
               if defaults(self.name).get(k) != v}
    return f"Attack({self.name!r}, label={self.label!r}, {changed})"


def make(name, label=None, **settings):
  """The attack called `name` with `settings` (see each attack's function
  for them; unknown settings are an error). Returns an `Attack`."""
  return Attack(name, label, **settings)


def resolve(attacks):
  """A list of `Attack`s from: a list of names or `Attack`s, or a dict
  label -> settings dict (with an optional "attack" key naming the attack;
  default the label) or label -> `Attack`."""
  if isinstance(attacks, Attack):
    return [attacks]
  if isinstance(attacks, (list, tuple)):
    return [a if isinstance(a, Attack) else make(a) for a in attacks]
  resolved = []
  for label, spec in attacks.items():
    if isinstance(spec, Attack):
      resolved.append(spec.replace(label=label))
      continue
    spec = dict(spec)
    resolved.append(make(spec.pop("attack", label), label=label, **spec))
  labels = [a.label for a in resolved]
  if len(set(labels)) != len(labels):
    raise errors.UserError(f"Attack labels must be unique. Received: {labels}")
  return resolved


def adversary(attack, clean_fraction=0.0):
  """The adversarial-training callable of an `Attack` for `FGRModel`.

  Args:
    attack: an `Attack` that `trains` (e.g. make("flow_pgd", epsilon=0.01,
      steps=10, random_start=True)).
    clean_fraction: share of each (per-replica) batch kept clean, in
      [0, 1) (Madry-style mixing; 0 = all adversarial).

  Returns:
    `adversary(backbone, images, labels, seed) -> images`; `seed` is the
    [2] int32 stateless seed of the step, passed to random attacks.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not isinstance(attack, Attack):
    raise errors.UserError(f"adversary needs an Attack (fgr_tf.attacks.make)."
                           f" Received: {attack!r}")
  if not attack.trains:
    raise errors.UserError(
        f"Attack {attack.name!r} cannot serve adversarial training. Use one "
        f"of {sorted(n for n, i in REGISTRY.items() if i.trains)}.")
  if not 0.0 <= clean_fraction < 1.0:
    raise errors.UserError("clean_fraction must be in [0, 1). Received: "
                           f"clean_fraction={clean_fraction}")
  seeded = "seed" in attack.settings
  clean_fraction = float(clean_fraction)

  def run(backbone, images, labels, seed=(0, 0)):
    overrides = {"seed": seed} if seeded else {}
    adv_images = attack(backbone, images, labels, **overrides).adv_images
    if not clean_fraction:
      return adv_images
    batch = tf.shape(images)[0]
    num_clean = tf.cast(tf.round(clean_fraction * tf.cast(batch, tf.float32)),
                        tf.int32)
    keep_clean = tf.range(batch) < num_clean
    return common.where_per_image(keep_clean, images, adv_images)

  return run


__all__ = ["Attack", "AttackResult", "REGISTRY", "adef", "adversary",
           "common", "defaults", "flow_pgd", "flow_smoothness", "make",
           "random_flow", "resolve", "stadv", "worst_of_k"]
