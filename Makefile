# RGrid developer commands. `make setup` is idempotent and fast the second time.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
RUNTIME := python:3.11

.PHONY: setup bytecode packages services runtime db demo test test-fast up down bench lint

setup: $(INSTALLED) bytecode packages services runtime db

# Every recipe writes to stderr, so that `make -s up` prints only its export lines.
$(INSTALLED): setup.cfg pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV) >&2
	@$(BIN)/pip install -q --upgrade pip >&2
	@$(BIN)/pip install -q -e '.[dev]' >&2
	@touch $@

# An installed wheel comes byte-compiled; an editable install does not, and where
# PYTHONDONTWRITEBYTECODE is set (it is on these machines) Python never writes the cache, so
# every `rgrid` command compiled its own modules from source: 0.13 s of a 0.29 s `--reuse` run.
# compileall writes regardless of that variable and skips what is up to date.
bytecode: $(INSTALLED)
	@$(BIN)/python -m compileall -q -j0 rgrid workers >&2

packages:
	@scripts/services.sh install >&2

services: $(INSTALLED) packages
	@scripts/services.sh start >&2

runtime: $(INSTALLED) packages
	@$(BIN)/rgrid runtime build $(RUNTIME) --if-missing >&2

db: services
	@# Not fatal: the services are shared, and another checkout may have migrated further.
	@$(BIN)/python scripts/stack.py migrate >&2 || true

demo: $(INSTALLED) bytecode runtime
	@scripts/demo.sh

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

up: setup
	@$(BIN)/python scripts/stack.py up $(if $(HOSTS),--hosts $(HOSTS))

down:
	@$(BIN)/python scripts/stack.py down

bench: setup
	$(BIN)/python bench/run.py
	$(BIN)/python bench/inputs.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/sandbox_disk.py
	$(BIN)/python bench/batch.py
	$(BIN)/python bench/cache_lookup.py
	$(BIN)/python bench/reuse_lookup.py
	$(BIN)/python bench/reuse_batch.py
	$(BIN)/python bench/projects.py
	$(BIN)/python bench/many_outputs.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check rgrid workers tests bench
