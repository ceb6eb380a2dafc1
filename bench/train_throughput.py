"""Stage-1 training throughput and peak memory: LayerMoE vs transformers' Mixtral.

LayerMoE: Qwen1.5-1.8B shapes (random weights) upcycled with the published G1 allocation
`5,4,3,5,4,3,2,3,3,2,2,2,2,2,2,2,2,3,3,4,4,4,3,3` (72 experts), stage-1 trainable set
(new experts + routers), loss = next-token + 0.01 x load balancing.
Mixtral: same shapes, 3 experts in every layer (also 72), top-2, grouped_mm experts,
experts + routers trainable, its own aux loss at 0.01.
Both: bf16 weights, AdamW, 8 x 1024 tokens per step. Each model runs in its own process so
peak memory is its own (CUDA: max_memory_allocated; CPU: peak RSS).

    python bench/train_throughput.py                  # full shapes, CUDA
    python bench/train_throughput.py --small --device cpu   # scaled down, < 2 min on a laptop CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

ALLOCATION = [5, 4, 3, 5, 4, 3, 2, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3]
FULL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, vocab_size=151936,
            num_attention_heads=16, num_key_value_heads=16, batch=8, seq=1024)
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=24, vocab_size=4096,
             num_attention_heads=4, num_key_value_heads=4, batch=2, seq=128)


def _shape_kwargs(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k not in ("batch", "seq")}


def build_layermoe(shape: dict, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from layermoe_cli.modeling import upcycle
    from layermoe_cli.training import freeze_for_stage

    config = Qwen2Config(**_shape_kwargs(shape), max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=False)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = upcycle(base, [n - 1 for n in ALLOCATION], top_k=2, inplace=True)
    freeze_for_stage(model, stage=1, current_generation=1)
    return model


def build_mixtral(shape: dict, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(**_shape_kwargs(shape), max_position_embeddings=max(2048, shape["seq"]), num_local_experts=3,
                           num_experts_per_tok=2, router_aux_loss_coef=0.01, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="grouped_mm")
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp.experts." in name or ".mlp.gate." in name)
    return model


def _step(kind: str, model, input_ids, optimizer, top_k: int = 2):
    from layermoe_cli.training.losses import load_balancing_over_layers

    if kind == "layermoe":
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        mask = input_ids.new_ones(input_ids.numel(), dtype=bool)
        loss = out.loss + 0.01 * load_balancing_over_layers(out.router_logits, mask, top_k)
    else:
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
        loss = out.loss  # includes router_aux_loss_coef x aux loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(kind: str, shape: dict, device: str, steps: int, warmup: int, queue) -> None:
    import torch

    torch.manual_seed(0)
    dtype = torch.bfloat16
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = (build_layermoe if kind == "layermoe" else build_mixtral)(shape, dtype, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-5)
    input_ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    for _ in range(warmup):
        _step(kind, model, input_ids, optimizer)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = _step(kind, model, input_ids, optimizer)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    queue.put(
        dict(model=kind, params_b=sum(p.numel() for p in model.parameters()) / 1e9,
             trainable_b=sum(p.numel() for p in trainable) / 1e9,
             tokens_per_s=steps * input_ids.numel() / elapsed, peak_gib=peak, loss=float(loss.detach()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="scaled-down shapes (hidden 128, vocab 4096, 2 x 128 tokens)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    shape = SMALL if args.small else FULL
    steps = args.steps or (3 if args.small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    ctx = mp.get_context("spawn")
    rows = []
    for kind in ("layermoe", "mixtral"):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(kind, shape, args.device, steps, warmup, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    tokens = shape["batch"] * shape["seq"]
    print(f"stage-1 training, {'small' if args.small else 'Qwen1.5-1.8B'} shapes, {args.device}, bf16, {shape['batch']} x {shape['seq']} = {tokens} tokens/step, {steps} steps")
    print(f"| model | params (B) | trainable (B) | tokens/s | peak memory (GiB) |")
    print(f"|---|---|---|---|---|")
    for r in rows:
        name = "LayerMoE (published allocation, 72 experts)" if r["model"] == "layermoe" else "Mixtral 3 experts x 24, grouped_mm"
        print(f"| {name} | {r['params_b']:.3f} | {r['trainable_b']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
