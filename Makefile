# `make demo`: set up .venv and run the built-in offline comparison (no network, no GPU).
# `make test`: set up .venv, lint and format-check the code (ruff), run the test suite.
# `make docs`: build the docs site into site/ (mkdocs, warnings as errors).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ntkmtl compare

test: lint
	$(PY) -m pytest -q -n 2 --durations=15 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed
	$(PY) perf/step_time.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
