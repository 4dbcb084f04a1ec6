# The two commands of the README: `make run` and `make test`. Both create or update .venv first.
# `make test-fast` runs the tests that start no Ray (the inner loop); `make lint` runs ruff and mypy.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast lint venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m orchestrator.sweep

test: $(VENV)/.installed
	WANDB_MODE=offline $(PY) -m pytest

test-fast: $(VENV)/.installed
	WANDB_MODE=offline $(PY) -m pytest -m "not ray"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs data experiments
