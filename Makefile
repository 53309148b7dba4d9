# Two commands for a fresh machine with Python 3.10+:
#   make lessons   create .venv, install the requirements, run lessons 01-06 with their defaults
#   make test      create .venv, install the requirements, run the test suite (slow tests excluded)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LESSONS := $(sort $(wildcard 0[1-6]_*.py))

.PHONY: lessons test test-all lint format setup clean

$(VENV)/installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, '/ torchvision', torchvision.__version__)"
	touch $@

setup: $(VENV)/installed

lessons: setup
	@set -e; for lesson in $(LESSONS); do echo; echo "=== $$lesson ==="; $(PY) $$lesson; done

test: setup
	$(PY) -m pytest
	$(VENV)/bin/ruff check .

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) outputs .pytest_cache
