# zgrid: every target creates .venv if it is missing and installs the project into it:
# `make run` and `make reset` what running needs (with the dashboard's web extra), every other
# target the dev extra too.
PYTHON ?= python3
BENCH_ARGS ?=  # options all three bench scripts take, e.g. BENCH_ARGS="--wait-quiet 240"
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed
# Debian's Chromium: the browser tests' and the dashboard benchmark's browser.
CHROMIUM := /usr/bin/chromium

.PHONY: run reset test lint bench bench-sim bench-sim-cold soak mosaik-demo clean

$(RUN_STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[web]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)  # resumes the grid saved by the last run, as it was left
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/run.sh

reset: $(RUN_STAMP)  # forgets the saved grid (not .venv) and starts the demo afresh
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/run.sh --fresh

# The browser tests' Chromium: Debian's package, installed where apt-get can (as root); where
# it cannot, the browser tests are skipped with that reason (under CI they fail instead).
$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq chromium >/dev/null; } \
	    || echo "could not install chromium: the browser tests will be skipped" >&2; \
	else \
	    echo "no $(CHROMIUM) (install Debian's chromium as root): the browser tests will be skipped" >&2; \
	fi

test: $(STAMP) | $(CHROMIUM)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check zgrid tests scripts
	$(BIN)/mypy zgrid

bench: $(STAMP) | $(CHROMIUM)  # real processes: signing; convergence, faults, idle, load; balancing; the dashboard
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench_signing.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench_converge.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench_balancing.py $(BENCH_ARGS)
	$(BIN)/python scripts/bench_dashboard.py

# The protocol and simulator modules compiled with mypyc, in a copy of the package of their
# own (scripts/mypyc_build.py; about 40 s): the long simulator runs below use it. Rebuilt
# whenever a source changes.
MYPYC_TREE := build/mypyc
$(MYPYC_TREE)/SOURCE_HASH: $(STAMP) $(shell find zgrid -name '*.py')
	$(BIN)/python scripts/mypyc_build.py $(MYPYC_TREE)

bench-sim: $(STAMP) $(MYPYC_TREE)/SOURCE_HASH  # scale of agreement; Phase II's simulated day, interpreted and compiled
	$(BIN)/python scripts/bench_sim.py
	$(BIN)/python scripts/bench_day.py --compiled $(MYPYC_TREE)

bench-sim-cold: $(STAMP) $(MYPYC_TREE)/SOURCE_HASH  # the 10,000-node cold start, compiled: about 8 minutes, 8 GB
	PYTHONPATH=$(MYPYC_TREE) $(BIN)/python scripts/bench_sim.py --cold-10k

mosaik-demo: $(STAMP)  # a day of 20 households, a battery and a plant: mosaik drives real nodes
	$(BIN)/python examples/mosaik/world.py --out mosaik-results $(MOSAIK_ARGS)

soak: $(STAMP)
	HYPOTHESIS_PROFILE=soak $(BIN)/pytest -q tests/test_properties.py

clean:
	rm -rf $(VENV) .zgrid .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info bench-results mosaik-results
