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
# The lowest Python that pyproject.toml allows, for tests/test_python_versions.py: one a pyenv install holds (this
# kind of machine has one), else a python3.10 on PATH; without either that test skips with the reason.
export STYLELORA_LOWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell command -v python3.10 2>/dev/null))

.PHONY: setup demo test test-fast browser bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The web UI's end-to-end test drives Debian's chromium through playwright (never playwright's own browser
# download, which needs the internet). Installing it needs root; without it the browser test skips with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: chromium not installed; the browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not gpu" --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not browser"

# Every GPU figure in one command (benchmarks/gpu_suite.py; refuses without a CUDA GPU). On a lent GPU machine there
# is no .venv (never carried): the machine's own python3 runs it, with the wheels carried in .whl/.
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
bench-gpu:
	$(BENCH_PY) benchmarks/gpu_suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .stylelora-cache out *.egg-info
