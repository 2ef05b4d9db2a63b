# Two entry points, each self-sufficient on a fresh machine with Python 3.11+:
#   make demo   creates .venv if missing, installs jaxpref, runs the main job on embedded defaults
#   make test   creates .venv if missing, installs the test extra, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,torch]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxpref demo

# One pytest worker per core (pytest-xdist): XLA compiles on one thread, so serial runs leave cores idle.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
