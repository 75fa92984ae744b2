# `make demo` and `make test` each build their own environment from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jaxprune train --config configs/lenet300_agp.py

lint: $(STAMP)
	$(PY) -m ruff check jaxprune tests benchmarks configs colabs
	$(PY) -m ruff format --check jaxprune tests benchmarks configs colabs

format: $(STAMP)
	$(PY) -m ruff check --fix jaxprune tests benchmarks configs
	$(PY) -m ruff format jaxprune tests benchmarks configs

test: lint
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) benchmarks/topk.py
	$(PY) benchmarks/masked_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
