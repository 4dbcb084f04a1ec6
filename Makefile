# The two commands of the README: `make run` and `make test`. Both create or update .venv first.
# `make test-fast` runs the tests that start no Ray (the inner loop); `make lint` runs ruff and mypy.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := WANDB_MODE=offline $(PY) -m pytest

.PHONY: run test test-fast lint venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m orchestrator.sweep

# The tests that start a Ray run one after another (two Rays at once would fight over the same cores);
# the others run beside them in a second pytest, whose report follows when both are done.
test: $(VENV)/.installed
	@log=$$(mktemp); \
	$(PYTEST) -m "not ray" >$$log 2>&1 & others=$$!; \
	$(PYTEST) -m ray; ray=$$?; \
	wait $$others; others=$$?; cat $$log; rm -f $$log; \
	echo "tests that start a Ray: exit $$ray; the others: exit $$others"; \
	test $$ray -eq 0 && test $$others -eq 0

test-fast: $(VENV)/.installed
	$(PYTEST) -m "not ray"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs data experiments
