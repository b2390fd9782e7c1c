# moeops: `make run` runs the whole pipeline, `make test` the test suite. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned, local version label included: without a GPU the CPU build (`+cpu`, a local wheel on
# machines like this one; elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu), with one
# PyPI's CUDA build. A bare `torch==2.13.0` lets the resolver pick the multi-GB CUDA build anywhere.
TORCH_VERSION := 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)$(if $(shell command -v nvidia-smi),,+cpu)
TORCH_INDEX ?=
ARGS ?=
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup run test test-all test-unit test-integration lint bench mlflow-ui mlflow-server serve render config-docs torch-spec clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

# One resolver call under a constraints file that holds the torch pin, so no later requirement can
# swap the build (a plain `pip install -e .` after the pinned torch may pull a newer CUDA build).
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
		"$(TORCH_SPEC)" -e '.[dev,bench]'
	$(PY) -c 'import torch; print("torch", torch.__version__)'
	@# mosaicml-streaming (bench extra) pulls PyPI's torchvision, built against PyPI's CUDA torch: beside
	@# the CPU build it fails on import ("operator torchvision::nms does not exist") and transformers then
	@# refuses every model class. Nothing here uses torchvision, so a wheel that cannot load is removed.
	$(PY) -c 'import torchvision' 2>/dev/null || $(PY) -m pip uninstall --quiet -y torchvision
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install moeops with its dev and bench extras

run: $(STAMP)  ## the whole pipeline on embedded defaults (ARGS="experiment=tiny ..." for overrides)
	$(PY) -m pipelines.run $(ARGS)

test: $(STAMP)  ## the fast suite: every test but those marked slow (make test-all runs those too)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)  ## the whole test suite, slow tests included (what .ci/run runs)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)  ## ruff check and ruff format --check (configured in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-unit: $(STAMP)  ## fast tests only (no Ray cluster, S3 or HTTP)
	$(PY) -m pytest -q tests/unit $(ARGS)

test-integration: $(STAMP)  ## tests with local Ray, SeaweedFS, mlflow server, HTTP
	$(PY) -m pytest -q tests/integration $(ARGS)

bench: $(STAMP)  ## the three benchmarks; JSON results in bench-*.json
	$(PY) tests/benchmarks/bench_data.py --json bench-data.json
	$(PY) tests/benchmarks/bench_moe.py --json bench-moe.json
	$(PY) tests/benchmarks/bench_serve.py --json bench-serve.json

.PHONY: gpu-check
# A lean environment of its own (torch, the project and its runtime dependencies; no dev/bench
# extras). NO_INSTALL=1: no environment at all, the python3 already there with its torch (>= 2.11,
# CUDA) runs the check straight from this checkout; it imports only torch and components/ (plus
# hydra-core, omegaconf, PyYAML and safetensors, small wheels that can be carried).
GPU_CHECK_VENV := .venv-gpu-check
gpu-check:  ## on a GPU node (< 8 min): full-model bf16 step (tokens/s, MFU, memory), EP, grouped GEMM -> gpu-check.json; NO_INSTALL=1 for a bare machine
ifeq ($(NO_INSTALL),1)
	$(PYTHON) infra/gpu_check.py --json gpu-check.json $(ARGS)
else
	@test -x $(GPU_CHECK_VENV)/bin/python || $(PYTHON) -m venv $(GPU_CHECK_VENV)
	echo "$(TORCH_SPEC)" > $(GPU_CHECK_VENV)/constraints.txt
	$(GPU_CHECK_VENV)/bin/python -m pip install --quiet -c $(GPU_CHECK_VENV)/constraints.txt \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)" -e .
	$(GPU_CHECK_VENV)/bin/python infra/gpu_check.py --json gpu-check.json $(ARGS)
endif

mlflow-ui: $(STAMP)  ## browse the local store at http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

mlflow-server: $(STAMP)  ## a tracking server for tracking=server (sqlite backend, proxied artifacts)
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow-server.db \
		--artifacts-destination $(CURDIR)/mlartifacts-server --host 127.0.0.1 --port 5000

serve: $(STAMP)  ## deploy the registry's champion and keep serving until Ctrl-C
	$(PY) -m pipelines.deploy serve.block=true $(ARGS)

render: $(STAMP)  ## re-render infra/k8s from conf/ and infra/runtime_env.pip.yaml from pyproject.toml (tests fail on drift)
	$(PY) -m infra.render
	$(PY) infra/runtime_env_json.py --write-pip-yaml

config-docs: $(STAMP)  ## regenerate docs/config.md from the schema (a test fails on drift)
	$(PY) -m components.config.docs

torch-spec:  ## print the torch requirement the install pins (TORCH_SPEC overrides it)
	@echo "$(TORCH_SPEC)"

clean:  ## remove local state (stores, caches, checkpoints), keep .venv
	rm -rf .moeops mlflow.db mlartifacts outputs multirun bench-*.json
