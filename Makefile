# Every target bootstraps its own virtual environment from nothing (python3 >= 3.11 and pip).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: install demo run test test-fast lint format bench bench-quick clean

install: $(VENV)/.installed

# deploy/Dockerfile runs these same pip commands without -e and the [dev] extra (tests/deploy checks it).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(PY) -m relay.demo

run: install
	$(BIN)/relay serve

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix relay tests bench
	$(BIN)/ruff format relay tests bench

bench: install
	$(PY) -m bench

bench-quick: install
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
