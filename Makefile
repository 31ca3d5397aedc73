# The two commands: `make demo` (set up + run the main job end to end) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# test files run in 2 processes, a file's tests together (module fixtures, ordered tests), the slowest files
# first (tests/conftest.py); measured on 2 cores: ~17 min vs ~19 in one process (the suite is mostly CPU-bound)
TEST_PROCS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# tinysoundfont's optional pyaudio dependency does not build and is not needed
	$(PY) -m pip install -q --no-deps "tinysoundfont>=0.3"
	touch $@

demo: setup
	$(PY) -m jobs.demo

test: setup
	$(PY) -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: setup
	$(PY) -m jobs.benchmark model --config tiny --json var/bench-model.json

clean:
	rm -rf $(VENV) var
