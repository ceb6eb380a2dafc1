#!/usr/bin/env bash
# Cut the demo model's GGUF (94 MB, over the 64 MiB one device call may carry) into two halves
# under .gpu-demo/ (git-ignored), to be carried by two consecutive calls; see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(.venv/bin/python -c "from layermoe.modeling.base import demo_model_path; print(demo_model_path())")
mkdir -p .gpu-demo
split --number=2 --suffix-length=1 "$gguf" .gpu-demo/part-
ls -l .gpu-demo/part-a .gpu-demo/part-b
