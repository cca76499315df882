# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a step they call.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup services test lint typecheck crds clean demo demo-quick

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

# Builds (once, cached under ~/.cache/cartridges) MinIO, etcd, kube-apiserver, kube-controller-manager, helm, SmolLM2.
services: setup
	$(PY) -m cartridges_e2e.binaries

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Regenerate crds/ and the chart's CRDs from the typed API models (a test fails on drift).
crds: setup
	$(PY) -m cartridges.crd

test: services lint
	$(PY) -m pytest

# Train, evaluate, serve and query a cartridge on the bundled corpus with SmolLM2 (about 7-8 minutes on 2 idle cores).
demo: setup
	$(VENV)/bin/cartridges demo

# The same with the small training budget (about a minute and a half on 2 idle cores): what CI runs.
demo-quick: setup
	$(VENV)/bin/cartridges demo --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
