# The two commands of the README. Both create ./.venv on first use, with exactly the
# versions pinned in uv.lock (`uv sync --frozen`: never re-resolved, never updated).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A uv on PATH is used as it is; without one, this version is installed once with pip
# into .tools/, so a fresh machine needs nothing but Python.
UV_VERSION := 0.13.9
UV ?= $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)

.PHONY: run test lint install lock clean

.tools/bin/uv:
	$(PY) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	@# --frozen installs the lock as it is, even one pyproject.toml has moved past: say so.
	$(UV) lock --check --quiet || { echo "uv.lock is out of date with pyproject.toml: run make lock" >&2; exit 1; }
	$(UV) sync --frozen --extra test --python $(PY) --no-python-downloads
	touch $(STAMP)

install: $(STAMP)

## make lock: re-resolve uv.lock after a change to pyproject.toml's dependencies
lock: | $(UV)
	$(UV) lock

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
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
