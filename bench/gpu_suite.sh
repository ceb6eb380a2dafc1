#!/usr/bin/env bash
# One command that proves the CUDA path: the CUDA tests and the GPU benchmarks, printed as the
# tables of BENCHMARKS.md (and into --out FILE). No network needed; see bench/README.md.
#   bench/gpu_suite.sh --out gpu-results.md
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_suite.py "$@"
