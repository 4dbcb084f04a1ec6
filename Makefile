# The two commands of the README: `make run` and `make test`. Both create or update .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test venv clean

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

clean:
	rm -rf $(VENV) runs data experiments
