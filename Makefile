# The two commands of the README: `make run` and `make test`. Both create the environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# What serving needs: forkserve and its runtime extras (process titles, status, metrics),
# not the development tools (mypy, ruff, matplotlib, ...), so the first `make run` is quick.
RUN_STAMP := $(VENV)/.installed-run
RUNTIME_EXTRAS := title,status,metrics

.PHONY: run test lint typecheck imports unit integration docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[$(RUNTIME_EXTRAS)]'
	touch $(RUN_STAMP)

# Everything: the runtime extras and the development tools (the dev extra holds both).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

# Serve the seed's hello app on 127.0.0.1:8080 with the fork model.
run: $(RUN_STAMP)
	$(BIN)/forkserve serve --bind 127.0.0.1:8080 --model fork --app hello

# Every check: lint, types, the import rules (pyproject.toml's import-linter contracts), that
# every documented flag and verb has a test, then the tests (unit
# and real-process integration). Under CI=true a system package that cannot be installed fails
# here, and any skip not on tests/conftest.py's allow-list fails pytest; elsewhere the tests
# that need it are skipped, and pytest's last lines count and name the skips.
test: $(STAMP)
	@bash scripts/ci-system-packages.sh || { [ "$${CI:-}" != true ] && \
	    echo "make test: a system package is missing: its tests will be skipped (CI fails)"; }
	$(BIN)/ruff check src tests scripts examples
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_architecture.py
	$(BIN)/python scripts/check_coverage.py
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts examples

typecheck: $(STAMP)
	$(BIN)/mypy

# What may import what: the layers and forbidden imports declared in pyproject.toml, and
# docs/architecture.md's diagram of them (regenerate it: scripts/check_architecture.py --write).
imports: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_architecture.py

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

# Regenerate the settings and signal tables of README.md from their declarations.
docs: $(STAMP)
	$(BIN)/python scripts/update_readme_tables.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .grimp_cache .import_linter_cache
