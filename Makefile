# Two entry points: `make run` (set up, then start the balancer) and
# `make test` (set up, then lint, check the formatting, and run the whole
# test suite).  Only python3 and make
# are needed; everything else is installed into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.imml-installed

.PHONY: setup run test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

# With IMML_BACKENDS set, balance over those hosts; without it, start three
# local stand-in ML hosts so a newcomer sees the balancer work.
run: $(STAMP)
	$(BIN)/twistd -n --pidfile= imml-balancer $(if $(IMML_BACKENDS),,--demo 3) $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	tools/ensure-browser.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/balancer.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
