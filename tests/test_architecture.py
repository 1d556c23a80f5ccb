"""Imports run experiment -> library, never back; attacks are specs."""

import ast
import pathlib

import numpy as np
import pytest

import fgr_tf
from fgr_tf import attacks
from fgr_tf import evaluation
from helpers import tiny_backbone, tiny_data

PACKAGE = pathlib.Path(fgr_tf.__file__).parent


def _imports(path):
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


LIBRARY = sorted(p for p in PACKAGE.rglob("*.py")
                 if "experiment" not in p.relative_to(PACKAGE).parts)


def test_the_library_never_imports_the_experiment_layer_or_configs():
  assert len(LIBRARY) > 20
  for path in LIBRARY:
    bad = {n for n in _imports(path)
           if n.startswith(("fgr_tf.experiment", "ml_collections", "configs"))}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_every_registered_attack_describes_itself():
  for name, info in attacks.REGISTRY.items():
    attack = attacks.make(name)
    described = attack.describe()
    assert described["attack"] == name and described["kind"] in (
        "bounded", "minimal")
    assert "jit_compile" not in described["settings"]
    if info.kind == "bounded":
      assert described["budget"]["name"] in described["settings"]
    # The function's settings are keyword arguments with defaults.
    assert set(attacks.defaults(name)) == set(attack.settings)


def test_unknown_attacks_and_settings_are_named():
  with pytest.raises(fgr_tf.errors.UserError, match="Unknown attack 'fgsm'"):
    attacks.make("fgsm")
  with pytest.raises(fgr_tf.errors.UserError,
                     match=r"Unknown setting\(s\) \['eps'\].*'epsilon'"):
    attacks.make("flow_pgd", eps=0.1)
  with pytest.raises(fgr_tf.errors.UserError, match="cannot serve"):
    attacks.adversary(attacks.make("adef"))


def test_an_added_attack_works_everywhere_through_its_spec():
  """random_flow was added with its own file and one registry line:
  evaluation, the callback and adversarial training take it as is."""
  images, labels = tiny_data(n=8)
  backbone = tiny_backbone()
  spec = attacks.make("random_flow", epsilon=0.05, tries=3)
  results = evaluation.evaluate(backbone, (images, labels),
                                {"rf": spec, "pgd": {"attack": "flow_pgd",
                                                     "steps": 2}})
  entry = results["attacks"]["rf"]
  assert entry["attack"] == "random_flow" and entry["kind"] == "bounded"
  assert entry["settings"]["tries"] == 3
  assert entry["budget"] == {"name": "epsilon", "value": 0.05,
                             "unit": "L-inf normalized flow"}
  adversary = attacks.adversary(spec)
  adv = adversary(backbone, images, labels, np.array([1, 2], np.int32))
  assert adv.shape == images.shape and not np.allclose(adv, images)
  # Within its budget: |flow| <= epsilon in normalized units.
  result = spec(backbone, images, labels)
  half = (images.shape[1] - 1) / 2
  assert float(np.abs(result.flow).max()) <= 0.05 * half * (1 + 1e-6)
