# The two commands a newcomer needs:  make demo   and   make test
# Each creates or reuses .venv and installs what it needs (Python 3.11+ and make only).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.txrpc-installed

.PHONY: demo test lint bench spec-deep fuzz venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "txrpc needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/txrpc demo

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check txrpc coordinator storage tests examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/txrpc bench rpc

# Fuzzing: FUZZ_RUNS inputs per target (default 1,000,000 each: ~4 min for the decoder
# under atheris, ~15 min for the live server on the 2-core machine). Any crash stops it.
FUZZ_RUNS ?= 1000000
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	$(BIN)/python -m txrpc._fuzz decoder --runs $(FUZZ_RUNS)
	$(BIN)/python -m txrpc._fuzz live --runs $(FUZZ_RUNS)

spec-deep: $(STAMP)
	TXRPC_TLA_DEEP=1 $(BIN)/pytest -q tests/test_tla.py -k deep -s

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
