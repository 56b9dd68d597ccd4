# Quick start:  make demo   |   make test
# Everything runs from the project venv, built here from requirements*.txt under the exact versions
# of requirements.lock (torch/torchvision come from the machine's local wheels; pinned exactly so
# pip never pulls a multi-GB CUDA build).  make lock  rewrites the lock from a fresh venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export PYTHONPATH := $(CURDIR)
# Two cores: keep BLAS/OMP threads from oversubscribing when DDP spawns several processes.
export OMP_NUM_THREADS ?= 2

.PHONY: venv lock test test-fast demo bench-quality bench-speed bench-service clean

venv: $(STAMP)

PIP_VERSION := 26.3
LOCK_VENV   := .lock-venv

$(STAMP): requirements.txt requirements-dev.txt requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -c requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(LOCK_VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	{ echo "# Exact versions of everything make installs (make lock writes this file; do not edit)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable --exclude pip --exclude setuptools --exclude wheel; } > requirements.lock
	rm -rf $(LOCK_VENV)

test: $(STAMP)
	$(PY) -m pytest -q --timeout 900 tests

demo: $(STAMP)
	$(PY) scripts/demo.py

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality $(ARGS)

bench-speed: $(STAMP)
	$(PY) -m benchmarks.speed $(ARGS)

bench-service: $(STAMP)
	$(PY) -m benchmarks.service $(ARGS)

clean:
	rm -rf .demo .pytest_cache $(LOCK_VENV)
