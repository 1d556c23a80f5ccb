"""The FGR_TF_* path switches: parsed values, and a clear error for a
misspelt one."""

import os
import subprocess
import sys

import pytest

from fgr_tf import environment
from fgr_tf import errors


def test_choice_switch_and_pixels_parse_their_values(monkeypatch):
  monkeypatch.delenv("FGR_TF_TEST_VAR", raising=False)
  assert environment.choice("FGR_TF_TEST_VAR", "xla", ("xla", "ops")) == "xla"
  assert environment.switch("FGR_TF_TEST_VAR") is True
  assert environment.switch("FGR_TF_TEST_VAR", default=False) is False
  assert environment.pixels("FGR_TF_TEST_VAR", 16) == 16
  monkeypatch.setenv("FGR_TF_TEST_VAR", "ops")
  assert environment.choice("FGR_TF_TEST_VAR", "xla", ("xla", "ops")) == "ops"
  monkeypatch.setenv("FGR_TF_TEST_VAR", "0")
  assert environment.switch("FGR_TF_TEST_VAR") is False
  assert environment.pixels("FGR_TF_TEST_VAR", 16) == 0
  monkeypatch.setenv("FGR_TF_TEST_VAR", "256")
  assert environment.pixels("FGR_TF_TEST_VAR", 16) == 256


@pytest.mark.parametrize("parse,value,expected", [
    (lambda: environment.choice("FGR_TF_TEST_VAR", "xla", ("xla", "ops")),
     "XLA", "one of 'xla', 'ops'"),
    (lambda: environment.switch("FGR_TF_TEST_VAR"), "true",
     "one of '1', '0'"),
    (lambda: environment.pixels("FGR_TF_TEST_VAR", 16), "16px",
     "an integer >= 0"),
    (lambda: environment.pixels("FGR_TF_TEST_VAR", 16), "-1",
     "an integer >= 0"),
])
def test_a_bad_value_names_the_variable(monkeypatch, parse, value, expected):
  monkeypatch.setenv("FGR_TF_TEST_VAR", value)
  with pytest.raises(errors.UserError) as error:
    parse()
  message = str(error.value)
  assert "FGR_TF_TEST_VAR" in message and expected in message
  assert repr(value) in message


def test_importing_with_a_misspelt_switch_says_which():
  """The library's own switches go through `environment`: a misspelt
  value stops the import with the variable named (before, "XLA" silently
  took the TF-ops path)."""
  result = subprocess.run(
      [sys.executable, "-c", "import fgr_tf"], capture_output=True,
      text=True, env=dict(os.environ, FGR_TF_DEFORM="XLA",
                          TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode != 0
  assert ("UserError: The environment variable FGR_TF_DEFORM must be one "
          "of 'xla', 'ops'" in result.stderr), result.stderr[-2000:]
