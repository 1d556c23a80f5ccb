"""Deformation attacks, batched and compiled with tf.function.

Every attack takes `(model, images, labels, **settings)`, runs the model in
inference mode without changing its variables, and returns an
`AttackResult` (adversarial images, pixel flow, success, iterations, T-norm
in pixels).
"""

from fgr_tf import errors
from fgr_tf.attacks.adef import adef
from fgr_tf.attacks.common import AttackResult
from fgr_tf.attacks.flow_pgd import flow_pgd
from fgr_tf.attacks.spatial import worst_of_k
from fgr_tf.attacks.stadv import flow_smoothness
from fgr_tf.attacks.stadv import stadv

ATTACKS = {
    "flow_pgd": flow_pgd,
    "stadv": stadv,
    "adef": adef,
    "worst_of_k": worst_of_k,
}


def get(name):
  """The attack function called `name` (one of `ATTACKS`)."""
  if name not in ATTACKS:
    raise errors.UserError(f"Unknown attack {name!r}. Expected one of "
                           f"{sorted(ATTACKS)}.")
  return ATTACKS[name]


__all__ = ["ATTACKS", "AttackResult", "adef", "flow_pgd", "flow_smoothness",
           "get", "stadv", "worst_of_k"]
