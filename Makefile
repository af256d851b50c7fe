# Two commands for a fresh clone: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Without an NVIDIA GPU, take the CPU build of torch (small, and on this kind of machine already on disk);
# with one, pip picks the CUDA build that the `torch` range in pyproject.toml allows.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export STYLELORA_HOME ?= $(CURDIR)/.stylelora-cache
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not browser"

clean:
	rm -rf $(VENV) .stylelora-cache out *.egg-info
