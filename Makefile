# evalrun — targets a newcomer guesses. Everything sets itself up.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
EVALRUN := $(VENV)/bin/evalrun
SPEC ?= examples/digits/eval.yaml
PYTEST := $(VENV)/bin/pytest
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv host-up base-image run test test-deps test-unit test-docker test-k8s lint fmt bench demo-shared \
        fuzz e2e-large cluster-up cluster-down schema clean

help:
	@echo "make run          – set up the embedded default and run examples/digits end to end"
	@echo "make test         – set up everything and run every test tier (unit, docker, k8s, kwok)"
	@echo "make lint | fmt   – mypy --strict + ruff + import contracts | ruff format"
	@echo "make bench        – benchmarks (results printed as JSON lines)"
	@echo "make e2e-large    – 2 GiB model on the cluster, verify, rerun from empty store"
	@echo "make fuzz         – coverage-guided fuzz targets, FUZZ_SECONDS in all (default 300)"
	@echo "make base-image   – build and push the base image (mmdebstrap)"
	@echo "make cluster-up / cluster-down – the local Kubernetes test cluster"

$(VENV)/.installed: pyproject.toml
	@command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
	@# The distribution's Python when it is 3.11 or newer: Debian builds it with PGO and LTO,
	@# and evalrun's start-up (its imports) takes about a third less than on a plain source
	@# build (docs/design-decisions.md, issue 15's fourth pass).
	test -x $(PY) || { p=/usr/bin/python3; $$p -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || p=python3; $$p -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

host-up:
	bash scripts/host-up.sh

base-image: venv host-up
	$(EVALRUN) base-image bookworm-python

# evalrun never creates a signing key on the fly outside a terminal: make one, visibly, first.
run: venv host-up
	$(EVALRUN) keys generate --if-absent
	$(EVALRUN) lock $(SPEC)
	$(EVALRUN) run $(SPEC)

schema: venv
	$(EVALRUN) schema > runner/schema/evaluation-v1.json

test: venv host-up test-deps cluster-up
	bash scripts/test.sh

test-deps:
	bash scripts/test-deps.sh

test-unit: venv test-deps
	bash scripts/test.sh unit

test-docker: venv host-up
	bash scripts/test.sh docker

test-k8s: venv host-up cluster-up
	bash scripts/test.sh k8s kwok

lint: venv
	$(VENV)/bin/mypy runner
	$(VENV)/bin/ruff check runner
	$(VENV)/bin/ruff format --check runner
	$(VENV)/bin/lint-imports --no-logo

fmt: venv
	$(VENV)/bin/ruff format runner tests
	$(VENV)/bin/ruff check --fix runner

bench: venv host-up cluster-up
	$(PY) benchmarks/bench_run.py
	$(PY) benchmarks/bench_preflight_large.py
	$(PY) benchmarks/bench_build.py
	$(PY) benchmarks/bench_bundle.py
	$(PY) benchmarks/bench_lock_inputs.py
	$(PY) benchmarks/bench_history.py --runs 100000
	$(PY) benchmarks/bench_kwok.py --runs 500 --nodes 50
	$(PY) benchmarks/bench_k8s_data.py --inputs-gib 2 --results-mib 1024

# Issue 12's end to end: a 2 GiB sharded model + dataset directory on the cluster under
# gVisor, >= 100 MiB of per-sample results, verify, rerun from an empty store and cache.
e2e-large: venv host-up cluster-up
	$(PY) benchmarks/e2e_k8s_large.py --model-gib 2 --shards 8 --results-mib 112

# Issue 17's shared cluster at full size: two teams, one Kueue quota of 8 GPUs, a TLS
# registry with credentials, 64 nightly runs and an urgent one, every run sealed.
demo-shared: venv host-up cluster-up
	$(PY) benchmarks/demo_shared_cluster.py --runs-per-team 32 --quota 8

# Coverage-guided fuzzing (atheris): every target in tests/fuzz/, one after the other,
# FUZZ_SECONDS in all; prints executions per target, crashes under build/fuzz/.
FUZZ_SECONDS ?= 300
fuzz: venv
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q 'atheris>=2.3'
	$(PY) tests/fuzz/run_fuzzers.py --seconds $(FUZZ_SECONDS)

# On the GPU machine (Python + torch, no index): carry build/gpu-wheels (scripts/gpu-wheels.sh).
gpu-validate:
	python3 scripts/gpu_validate.py

cluster-up:
	bash tests/cluster/up.sh

cluster-down:
	bash tests/cluster/down.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
