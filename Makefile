# The same commands for people, hooks and CI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= ./test-models

.PHONY: install lint typecheck test test-all check serve test-models bench bench-scale constraints

# What the README's test command does, step by step.
install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'

lint:
	$(BIN)/ruff check reranker_server tests bench examples
	$(BIN)/mypy

test:
	$(BIN)/python -m pytest

test-all:  # slow tests too (GPU tests run only where CUDA is present)
	$(BIN)/python -m pytest -m 'not gpu or gpu'

check: lint test

serve:
	$(BIN)/reranker-server serve

test-models:
	$(BIN)/reranker-server make-test-models $(MODELS)

bench:
	$(BIN)/python bench/run_all.py

bench-scale:  # replicas behind the load balancer on a Docker engine (bench/scale.py)
	docker build -t reranker-server:bench .
	$(BIN)/python bench/scale.py --image reranker-server:bench

# deploy/docker/constraints.txt: what a clean install of the image's packages resolves to today.
constraints:
	rm -rf .constraints-venv
	$(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/pip install torch==2.13.0
	.constraints-venv/bin/pip install '.[torch]'
	sed -n '/^#/p' deploy/docker/constraints.txt > .constraints.txt
	.constraints-venv/bin/pip freeze --all --exclude reranker-server | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' >> .constraints.txt
	mv .constraints.txt deploy/docker/constraints.txt
	rm -rf .constraints-venv
