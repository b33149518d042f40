# Two entry points: `make run` (set up, then start the balancer) and
# `make test` (set up, then lint, check the formatting, and run the whole
# test suite).  Only python3 and make are needed; everything else is
# installed into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# `make run` installs imml and its runtime dependencies only (the demo's
# stand-in hosts are part of imml); `make test` adds the test extra (pytest,
# ruff, onnxruntime, selenium, build).  One stamp each: neither reinstalls
# what the other already did.
RUNTIME := $(VENV)/.imml-runtime
TESTING := $(VENV)/.imml-test

# imml is installed editable in setuptools' strict mode: a tree of links
# under build/ in which twistd finds the twisted/plugins/ dropins.  It links
# each file, so it is made again when a file is added to or removed from
# the package: when one of its folders changes.
EDITABLE := --config-settings editable_mode=strict
SOURCES  := setup.cfg pyproject.toml $(shell find imml twisted/plugins -type d -not -name __pycache__)

.PHONY: setup run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUNTIME): $(SOURCES) | $(BIN)/python
	$(BIN)/python -m pip install -q -e . $(EDITABLE)
	touch $@

$(TESTING): $(SOURCES) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]' $(EDITABLE)
	touch $@ $(RUNTIME)

# A development environment: everything `make test` needs.
setup: $(TESTING)

# With IMML_BACKENDS set, balance over those hosts; without it, start three
# local stand-in ML hosts so a newcomer sees the balancer work.  More
# options go in ARGS:  make run ARGS="--strategy round-robin --admin tcp:8081"
run: $(RUNTIME)
	$(BIN)/twistd -n --pidfile= imml-balancer $(if $(IMML_BACKENDS),,--demo 3) $(ARGS)

test: $(TESTING)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	tools/ensure-browser.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(TESTING)
	$(BIN)/python bench/balancer.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
