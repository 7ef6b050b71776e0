# calbench: `make run` (simulated lab + IPython profile), `make test`, `make demo`, `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CALBENCH_HOME ?= $(CURDIR)/var
export MPLBACKEND ?= Agg

.PHONY: run test test-slsvirtual demo bench iocs up down venv clean postgres

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: venv
	$(BIN)/calbench up
	MPLBACKEND= $(BIN)/ipython --profile-dir=profile_collection

test: venv postgres
	$(BIN)/pytest -q

# the EIGER hardware backend against PSI's virtual detector server: README, "PSI's virtual EIGER server"
test-slsvirtual: venv
	@test -n "$$CALBENCH_SLS_BUILD" || { echo "set CALBENCH_SLS_BUILD to a slsDetectorPackage 9.2.0 build folder (README, \"PSI's virtual EIGER server\")"; exit 2; }
	$(BIN)/pip install --quiet -e ".[test,hardware]"
	$(BIN)/pytest -v -s -m slsvirtual tests/test_eiger_slsvirtual.py

# The persistence tests start a throw-away PostgreSQL server (tests/pg_support.py): install the
# server binaries if the machine has none (needs root, as on CI).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

demo: venv
	$(BIN)/calbench demo

bench: venv
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

iocs: venv
	$(BIN)/calbench ioc run --sim

up: venv
	$(BIN)/calbench up

down: venv
	$(BIN)/calbench down

clean:
	rm -rf $(VENV) var .pytest_cache
