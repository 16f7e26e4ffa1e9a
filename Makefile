# The same commands for people, hooks and CI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= ./test-models

.PHONY: install lint typecheck test test-all check serve test-models bench

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
