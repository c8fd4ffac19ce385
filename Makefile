# One entry point for people and CI: `make up` runs the local stack, `make
# test` runs every check and test. Both install what they need on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every folder under libs/ and services/ with a pyproject.toml is a package.
PACKAGES := $(patsubst %/pyproject.toml,%,$(wildcard libs/*/pyproject.toml services/*/pyproject.toml))
INSTALLED := $(VENV)/.installed

.PHONY: install up test test-fast pytest check lint typecheck gen check-gen lock bench bench-ratelimit bench-datastore bench-scheduler bench-scale bench-openai clean

install: $(INSTALLED)

# Everything is pinned in requirements.lock (`make lock`) and installed without
# resolving again, each file checked against its hash; the workspace packages
# are editable installs on top.
$(INSTALLED): requirements.lock $(addsuffix /pyproject.toml,$(PACKAGES))
	@$(PYTHON) -c 'import sys; sys.exit("sluice needs Python 3.11") if sys.version_info[:2] != (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation $(addprefix -e ,$(PACKAGES))
	touch $@

up: install
	$(VENV)/bin/sluice up

test: check pytest

pytest: install
	$(PY) -m pytest

# The edit-test loop: no model servers, no whole stack (those are `slow` and `e2e`; `make test` runs all).
test-fast: install
	$(PY) -m pytest -m "not slow and not e2e" -q

check: lint typecheck check-gen

# pyproject.toml's lists of packages, ruff, and the layers (pyproject.toml's import
# contracts: no library imports a service, no service another).
lint: install
	$(PY) scripts/check_workspace.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: install
	$(VENV)/bin/mypy

# Regenerate the protobuf stubs and the compose copy of Envoy's config.
gen: install
	$(PY) scripts/gen_protos.py
	$(PY) -m sluice_devstack.envoy_config

check-gen: install
	$(PY) scripts/gen_protos.py --check
	$(PY) -m sluice_devstack.envoy_config --check

lock:
	scripts/lock.sh

bench: install
	$(VENV)/bin/sluice bench

bench-ratelimit: install
	$(VENV)/bin/sluice bench ratelimit

bench-datastore: install
	$(VENV)/bin/sluice bench datastore

bench-scheduler: install
	$(VENV)/bin/sluice bench scheduler

bench-scale: install
	$(VENV)/bin/sluice bench scale

bench-openai: install
	$(VENV)/bin/sluice bench openai

clean:
	rm -rf $(VENV) .sluice .mypy_cache .ruff_cache .pytest_cache
