# One-command set-up and checks. `make test` works on a fresh machine with
# Python >= 3.10: it creates .venv, installs fgr_tf with its test extras and
# runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: venv test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n 2 -q

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
