# The two set-up commands of the README: `make serve` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install serve test lint

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'

serve: install
	fluxserve serve --data-dir ./data

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .
