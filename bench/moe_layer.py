"""Forward+backward time of one MoE layer: layermoe's block vs transformers' Mixtral block.

Real shapes are Qwen1.5-1.8B's FFN (hidden 2048, intermediate 5504, bf16, top-2) at
E = 2, 3, 5 experts and 2k / 8k / 16k tokens. Rows compare, at the same E:
  ours grouped / ours loop          LayermoeMoeBlock, moe_kernel="grouped" / "loop"
  ours grouped, cls X% old          same, with a routing classifier that sends X% of the tokens
                                    to expert 0 alone (no top-k, no other expert)
  mixtral grouped_mm / eager        MixtralSparseMoeBlock with experts_implementation=...

    python bench/moe_layer.py                      # CUDA, real shapes
    python bench/moe_layer.py --device cpu --small # smoke run on a CPU, well under a minute
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import MixtralConfig, Qwen2Config
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from layermoe.modeling import LayermoeMoeBlock

REAL = dict(hidden=2048, intermediate=5504, tokens=(2048, 8192, 16384), dtype="bfloat16")
SMALL = dict(hidden=64, intermediate=176, tokens=(128, 512), dtype="float32")


def ours(hidden, intermediate, experts, dtype, device, impl, old_fraction=0.0):
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate)
    block = LayermoeMoeBlock(
        Qwen2MLP(cfg),
        [experts - 1],
        top_k=2,
        classifier_classes=2 if old_fraction else 0,
        moe_kernel=impl,
    )
    block.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        if old_fraction:  # class decided by the sign of feature 0 (set per token in the input)
            block.classifier.weight.zero_()
            block.classifier.weight[0, 0] = 10.0
            block.classifier.weight[1, 0] = -10.0
    return block


def mixtral(hidden, intermediate, experts, dtype, device, impl):
    cfg = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=experts,
        num_experts_per_tok=2,
        experts_implementation=impl,
    )
    block = MixtralSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def time_fwd_bwd(block, tokens, hidden, dtype, device, iters, warmup, old_fraction=0.0) -> float:
    """Median milliseconds of one forward + backward over `tokens` tokens (one sequence)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    if old_fraction:
        n_old = int(tokens * old_fraction)
        x[0, :n_old, 0] = 1.0
        x[0, n_old:, 0] = -1.0
    grad = torch.randn(1, tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    times = []
    for step in range(warmup + iters):
        xi = x.clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        block(xi).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
        block.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--experts", default="2,3,5", help="experts per layer incl. expert 0")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default by shape set)")
    ap.add_argument("--old-fraction", type=float, default=0.5, help="share of tokens the classifier sends to expert 0")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    args = ap.parse_args()

    shape = SMALL if args.small else REAL
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or shape["dtype"])
    hidden, inter = shape["hidden"], shape["intermediate"]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(shape["tokens"])
    experts = [int(e) for e in args.experts.split(",")]
    iters = args.iters or (3 if args.small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    torch.manual_seed(0)

    pct = int(round(args.old_fraction * 100))
    columns = [
        ("ours grouped", lambda e: ours(hidden, inter, e, dtype, device, "grouped"), 0.0),
        ("ours loop", lambda e: ours(hidden, inter, e, dtype, device, "loop"), 0.0),
        (f"ours grouped, cls {pct}% old", lambda e: ours(hidden, inter, e, dtype, device, "grouped", args.old_fraction), args.old_fraction),
        ("mixtral grouped_mm", lambda e: mixtral(hidden, inter, e, dtype, device, "grouped_mm"), 0.0),
        ("mixtral eager", lambda e: mixtral(hidden, inter, e, dtype, device, "eager"), 0.0),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {dtype}, hidden {hidden}, intermediate {inter}, top-2, fwd+bwd median ms of {iters} (warmup {warmup})\n")
    print("| E | tokens | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for e in experts:
        blocks = [(make(e), frac) for _, make, frac in columns]
        for t in tokens:
            cells = [f"{time_fwd_bwd(b, t, hidden, dtype, device, iters, warmup, frac):.1f}" for b, frac in blocks]
            print(f"| {e} | {t} | " + " | ".join(cells) + " |", flush=True)
        del blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
