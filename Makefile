# Two entry points for people (README): `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint protos protos-check bench clean

$(STAMP): pyproject.toml sdk_python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ./sdk_python -e '.[dev]'
	touch $(STAMP)

# `make demo ARGS=--keep-running` leaves the server up for the browser desk and console.
demo: $(STAMP)
	$(BIN)/cuepoint demo --scenarios scenarios $(ARGS)

test: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/ruff check server sdk_python tests scripts bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check server sdk_python tests scripts bench
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
