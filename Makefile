# `make demo`: set up .venv and run the built-in offline comparison (no network, no GPU).
# `make test`: set up .venv and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[data,plots,test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ntkmtl compare

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
