# Every target installs what it needs: a fresh clone runs `make demo` or `make test` as is.
# Caches live outside the repository (~/.cache/uv for wheels, ~/.cache/cheapspot for the
# cluster binaries built from source), so a second run is fast.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
EXTRAS := operator,worker,dev
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: venv lint unit cluster-binaries integration test demo clean-cluster

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check 'uv>=0.4'
	@echo "installing cheapspot[$(EXTRAS)] into $(VENV) (first time: torch and friends, a few minutes)"
	@$(VENV)/bin/uv pip install --python $(PY) -q -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-* && touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: venv
	$(PYTEST) -m "unit" -q

# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok from
# the Go module proxy once; later runs find them in the cache and build nothing.
cluster-binaries: venv
	$(VENV)/bin/cheapspot build

integration: cluster-binaries
	$(PYTEST) -m "not unit" -q

test: lint unit integration

demo: cluster-binaries
	$(VENV)/bin/cheapspot demo

clean-cluster: venv
	$(VENV)/bin/cheapspot down
