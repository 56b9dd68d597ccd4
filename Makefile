# Quick start:  make demo   |   make test
# Everything runs from the project venv, built here from requirements*.txt (torch/torchvision come
# from the machine's local wheels; pinned exactly so pip never pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export PYTHONPATH := $(CURDIR)
# Two cores: keep BLAS/OMP threads from oversubscribing when DDP spawns several processes.
export OMP_NUM_THREADS ?= 2

.PHONY: venv test test-fast demo bench-quality bench-speed bench-service clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

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
	rm -rf .demo .pytest_cache
