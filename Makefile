# The two commands of the README. Both create ./.venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make run: the daemon against the database and bucket of config.toml / the environment
run: $(STAMP)
	$(BIN)/python scripts/run.py

## make test: lint, type-check and the whole test suite (what CI runs)
test: $(STAMP)
	$(BIN)/ruff check fleetticketsd tests bench scripts
	$(BIN)/ruff format --check fleetticketsd tests bench scripts
	$(BIN)/mypy fleetticketsd
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check fleetticketsd tests bench scripts
	$(BIN)/mypy fleetticketsd

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
