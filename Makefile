# Two commands on a fresh machine with Python ≥ 3.10 and pip:  `make demo`  and  `make test`.
# Both create .venv (torch pinned to the CPU wheel by constraints.txt) on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Tests may take the default model from ../shared/models (no download); plipy itself never needs it.
SHARED_MODELS := $(wildcard $(CURDIR)/../shared/models)

.PHONY: test-slow setup demo test lint bench screenshots clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,test]"
	touch $@

demo: setup
	$(BIN)/plipy scan --plot --html

# The style the machines hold: formatting, lint (complexity ≤ 12), types, and the layers contract (docs/architecture.md).
lint: setup
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The default suite (about 12 minutes on 2 idle cores); the tests marked slow (about 7 more) run in test-slow and CI.
test: setup lint
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python -m pytest -m "not slow"

test-slow: setup
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python -m pytest -m slow

bench: setup
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python benchmarks/engine_overhead.py
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python benchmarks/knockout_speed.py
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python benchmarks/scan_speed.py
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python benchmarks/steer_speed.py
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python benchmarks/html_report.py

# The report pictures in docs/img (README): real runs, opened in headless chromium.
screenshots: setup
	PLIPY_MODELS="$${PLIPY_MODELS:-$(SHARED_MODELS)}" $(BIN)/python scripts/screenshots.py --out docs/img

clean:
	rm -rf $(VENV) results .pytest_cache
