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

.PHONY: venv lock test test-fast demo bench-quality bench-speed bench-service bench-coco-scale gpu-wheels gpu-check clean

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

# The dashboard's browser test drives Debian's chromium through its chromedriver: installed once
# (root, or through sudo) when either is missing.
BROWSER_STAMP := $(VENV)/.chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }
	touch $(BROWSER_STAMP)

# One xdist worker per core, a fixed 2 (this machine's and CI's): `-n auto` counts the host's cores
# in a CPU-limited container, and each worker starts its own Redis/PostgreSQL/API stack.  Whole test
# files go to one worker (loadfile), so module fixtures start once.  Serially:  make test TEST_WORKERS=0
TEST_WORKERS ?= 2
PYTEST_ARGS  ?=
test: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q --timeout 900 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) scripts/demo.py $(ARGS)

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality $(ARGS)

bench-speed: $(STAMP)
	$(PY) -m benchmarks.speed $(ARGS)

bench-service: $(STAMP)
	$(PY) -m benchmarks.service $(ARGS)

# Registers a COCO-2017-train-shaped dataset (118 k images, 860 k boxes): time and peak RSS.
bench-coco-scale: $(STAMP)
	$(PY) -m benchmarks.coco_scale $(ARGS)

# GPU machines have a Python 3.12 with torch and torchvision but no network: `make gpu-wheels`
# (here, with network) fetches the rest of what gid_core and the check import into wheels/;
# `make gpu-check` (there) installs them offline into a venv on top of the system's torch when
# they are missing, then runs the check (it exits 0 at once without CUDA).
GPU_PYTHON  ?= python3
GPU_VENV    := .gpu-venv
GPU_WHEELS  := wheels
GPU_REQS    := pydantic numpy safetensors pycocotools scikit-learn scikit-image pyyaml tqdm
GPU_IMPORTS := import pydantic, numpy, safetensors, pycocotools, sklearn, skimage, yaml, tqdm

gpu-wheels:
	$(PYTHON) -m pip download -q --python-version 3.12 --only-binary=:all: -d $(GPU_WHEELS) -c requirements.lock $(GPU_REQS)

gpu-check:
	@if $(GPU_PYTHON) -c "$(GPU_IMPORTS)" 2>/dev/null; then py=$(GPU_PYTHON); else 	  test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV); 	  $(GPU_VENV)/bin/python -m pip install -q --no-index --find-links $(GPU_WHEELS) $(GPU_REQS) || exit 1; 	  py=$(GPU_VENV)/bin/python; fi; 	$$py -m benchmarks.gpu_check $(ARGS)

clean:
	rm -rf .demo .pytest_cache $(LOCK_VENV)
