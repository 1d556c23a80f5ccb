"""setup.cfg pins the TensorFlow / Keras range that was tested."""

import configparser
import importlib.metadata

from packaging.requirements import Requirement

from helpers import ROOT


def _requirements():
  config = configparser.ConfigParser()
  config.read(ROOT / "setup.cfg")
  lines = config["options"]["install_requires"].strip().splitlines()
  return {r.name: r for r in (Requirement(line) for line in lines)}


def test_tensorflow_and_keras_have_tested_bounds_the_installed_fit():
  """fgr_tf uses private Keras members (README, "Supported versions"): an
  untested release must not be installed silently."""
  requirements = _requirements()
  for name in ("tensorflow", "keras"):
    specifier = requirements[name].specifier
    operators = {spec.operator for spec in specifier}
    assert operators & {"<", "<="} and operators & {">=", ">"}, specifier
    installed = importlib.metadata.version(name)
    assert specifier.contains(installed), (name, installed, specifier)
