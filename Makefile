# One-command set-up and checks. `make test` works on a fresh machine with
# Python >= 3.10: it creates .venv, installs fgr_tf with its test extras and
# runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: venv test test-fast bench demo fashion-mnist clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# TensorFlow's C++ start-up chatter (oneDNN, cuInit on CPU machines) is
# printed before its log level applies; drop it so pytest's summary is last.
export TF_CPP_MIN_LOG_LEVEL ?= 3
QUIET_TF = 2>&1 | grep --line-buffered -v -E '^(I0000|W0000|E0000|WARNING: All log messages before absl)'; exit $${PIPESTATUS[0]}

# --dist loadscope: each test module on one worker, so its module fixtures
# (trained models) are built once, not once per worker.
PYTEST = $(PY) -m pytest -n 2 --dist loadscope -q

test: venv
	$(PYTEST) $(QUIET_TF)

test-fast: venv
	$(PYTEST) -m "not slow" $(QUIET_TF)

bench: venv
	$(PY) -m bench.steps --model vgg11 --batch 128 --repeats 8

# Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files, offline).
FMNIST = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@if [ -e $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing. Run: sudo apt-get install dataset-fashion-mnist" >&2; \
	  exit 1; \
	fi

# Quickstart: baseline vs FGR on Fashion-MNIST, evaluated under flow-PGD,
# stAdv, ADef and worst-of-k; prints the table and writes runs/demo/*.png.
DEMO = runs/demo
demo: venv fashion-mnist
	$(PY) bin/train.py --config=configs/fashion_mnist_demo.py --workdir=$(DEMO)/baseline --config.fgr.lam=0
	$(PY) bin/train.py --config=configs/fashion_mnist_demo.py --workdir=$(DEMO)/fgr100
	$(PY) bin/evaluate.py --config=configs/fashion_mnist_demo.py --workdir=$(DEMO)/baseline
	$(PY) bin/evaluate.py --config=configs/fashion_mnist_demo.py --workdir=$(DEMO)/fgr100
	$(PY) bin/plot.py --results=$(DEMO)/baseline/results.json,$(DEMO)/fgr100/results.json --output_dir=$(DEMO)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
