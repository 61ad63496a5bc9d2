# Two commands set up a fresh machine and run: `make demo` (the main jobs) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench quality lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this release lies on disk as a CPU build; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-losses distill
	$(VENV)/bin/lightning-losses calibrate --quick

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do [ $$script = benchmarks/quality.py ] || $(PY) $$script || exit 1; done

quality: $(STAMP)
	$(PY) benchmarks/quality.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_losses tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) results lightning_logs
