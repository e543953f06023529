# zgrid: every target creates .venv if it is missing and installs the project into it.
PYTHON ?= python3
BENCH_ARGS ?=  # options all three bench scripts take, e.g. BENCH_ARGS="--wait-quiet 240"
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-sim bench-sim-cold soak clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/run.sh

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check zgrid tests scripts
	$(BIN)/mypy zgrid

bench: $(STAMP)  # real processes: signed adverts; convergence, faults, idle, load; balancing
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench_signing.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench_converge.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/bench_balancing.py $(BENCH_ARGS)

bench-sim: $(STAMP)
	$(BIN)/python scripts/bench_sim.py

bench-sim-cold: $(STAMP)  # the 10,000-node cold start: about 15 minutes, about 5 GB
	$(BIN)/python scripts/bench_sim.py --cold-10k

soak: $(STAMP)
	HYPOTHESIS_PROFILE=soak $(BIN)/pytest -q tests/test_properties.py

clean:
	rm -rf $(VENV) .zgrid .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info bench-results
