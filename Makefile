# The two set-up commands of the README: `make serve` and `make test`. Everything goes into a virtualenv:
# the one that is active ($VIRTUAL_ENV), else ./.venv, made on first use (never the system Python).
VENV ?= $(or $(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip

PIP_QUIET := $(PIP) install --quiet --disable-pip-version-check

.PHONY: install install-runtime serve test test-fast test-long lint FORCE

$(PYTHON):
	python3 -m venv $(VENV)

# Installs are remembered by stamp files in the virtualenv, each holding the checkout it installed (the
# install is editable: it points there). They run again only when pyproject.toml is newer or the checkout
# is another one, so `make serve` starts in seconds when nothing changed.
STAMP := $(VENV)/.fluxserve-installed
REINSTALL = $(if $(filter $(CURDIR),$(shell cat $(1) 2>/dev/null)),,FORCE)

# What serving needs, and no more: the API and the local engines (`.[local]`); no test tools, no torchao.
install-runtime: $(STAMP)-runtime
$(STAMP)-runtime: pyproject.toml $(call REINSTALL,$(STAMP)-runtime) | $(PYTHON)
	$(PIP_QUIET) torch==2.13.0
	$(PIP_QUIET) -e '.[local]'
	@echo '$(CURDIR)' > $@

install: $(STAMP)-test
$(STAMP)-test: $(STAMP)-runtime $(call REINSTALL,$(STAMP)-test)
	$(PIP_QUIET) -e '.[local,test]'
	@echo '$(CURDIR)' > $@

# `make serve PORT=8001 HOST=0.0.0.0`; unset, FLUXSERVE_PORT / FLUXSERVE_HOST or the defaults apply.
serve: install-runtime
	$(VENV)/bin/fluxserve serve --data-dir ./data $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

# The tier is the folder: tests/unit (in-process), tests/e2e (real servers, real pipelines), tests/long.
# Two test processes (pytest-xdist), a file each at a time: most end-to-end tests wait on their servers.
# The long scenarios (kill -9 recoveries, five test hosts, the bundled model's evaluation) take minutes
# more: `make test-long` (CI runs both).
test: install .venv-blackforest/bin/python tests/e2e/js/node_modules
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests/unit tests/e2e

# The several-hosts test needs root, iproute2 and PostgreSQL.
test-long: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests/long

# In-process tests only (no server subprocess), each on SQLite and disk only: about a minute.
test-fast:
	$(PYTHON) -m pytest -q -n 2 tests/unit -m "not postgres and not s3"

# The vendor's official client for tests/e2e/test_vendor_blackforest.py, in its own virtualenv: it pins
# pillow==10.4.0, which clashes with ours. Removed again if the install fails, so a rerun retries.
.venv-blackforest/bin/python:
	rm -rf .venv-blackforest
	$(PYTHON) -m venv .venv-blackforest && .venv-blackforest/bin/pip install --quiet blackforest==0.1.3 \
		|| { rm -rf .venv-blackforest; exit 1; }

# Replicate's JavaScript client and the Vercel AI SDK provider, for tests/e2e/test_replicate_clients.py (its
# test is skipped without node, unless FLUXSERVE_REQUIRE_NODE=1). Pinned by tests/e2e/js/package-lock.json.
tests/e2e/js/node_modules: tests/e2e/js/package-lock.json
	if command -v npm >/dev/null; then cd tests/e2e/js && npm ci --silent --no-audit --no-fund && touch node_modules; fi

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy
