#!/usr/bin/env bash
# Fill a folder (default .whl, git-ignored) with the wheels bench/gpu_suite.sh installs on a GPU
# machine that has no network: the packages layermoe needs beyond what a CUDA image ships
# (torch, transformers, accelerate, numpy, pyarrow, pandas, ... are there already).
# Versions are the locked ones (requirements/lock.txt: what CI tested together); the target is
# the GPU image's Python (3.12, x86_64, manylinux).
#   bench/fetch_wheels.sh [DIR] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
pyver=${2:-3.12}
packages="datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection langcodes eld gguf"
pins=()
for p in $packages; do
    # the lock spells names as pip freeze does (pydantic_core): compare them with - and _ alike
    v=$(grep -iE "^${p//-/[-_]}==" requirements/lock.txt | head -1 | cut -d= -f3)
    pins+=("$p${v:+==$v}")
done
mkdir -p "$dest"
"${PYTHON:-python3}" -m pip download --quiet --dest "$dest" --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    "${pins[@]}"
du -sh "$dest"
ls "$dest"
