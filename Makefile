# fleetlora: `make demo` (set up + run the main job) and `make test` (set up + run every test).
# `make fleet`: a local fleet on loopback (TLS, SuperNode auth), 2 rounds, every process stopped at the end.
# Each setup step is idempotent and quick when already done.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check

# Flower: project-local home, no telemetry, never build a runtime env (it would pull CUDA torch).
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PATH := $(BIN):$(PATH)

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test setup model lint bench clean browser fleet

demo: setup model
	$(BIN)/python -m simulations.demo $(ARGS)

fleet: setup model
	$(BIN)/fleetlora fleet up $(ARGS)

test: setup model lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's chromium, which Playwright drives in the dashboard's browser tests (Playwright's own download cannot work here).
browser:
	test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

setup: $(VENV)/.installed

# torch first, from the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

model: setup
	$(BIN)/fleetlora model fetch

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .flwr outputs

bench: setup model $(VENV)/.bench-installed
	$(BIN)/python -m simulations.bench $(ARGS)

# The bench extra (llama-cpp-python, built from source: minutes), once; not part of setup (CI never builds it).
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[bench]"
	touch $@
