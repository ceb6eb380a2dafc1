"""Stage-1 training throughput and peak memory: LayerMoE vs transformers' Mixtral.

LayerMoE: Qwen1.5-1.8B shapes (random weights) upcycled with the published G1 allocation
`5,4,3,5,4,3,2,3,3,2,2,2,2,2,2,2,2,3,3,4,4,4,3,3` (72 experts), stage-1 trainable set
(new experts + routers), loss = next-token + 0.01 x load balancing.
Mixtral: same shapes, 3 experts in every layer (also 72), top-2, grouped_mm experts,
experts + routers trainable, its own aux loss at 0.01.
Both: bf16 weights, AdamW, 8 x 1024 tokens per step. Each model runs in its own process so
peak memory is its own (CUDA: max_memory_allocated; CPU: peak RSS).

MFU = model FLOPs per second / the GPU's dense bf16 peak (H100/H200 SXM datasheet: 989.4
TFLOP/s; `--peak-tflops` for another card). Model FLOPs per token follow the usual
convention (PaLM, appendix B): 6 x active matmul parameters (every weight a token passes
through: top-k experts, not all; the input embedding is a lookup and is left out) plus
12 x layers x hidden x sequence for attention. Frozen weights get no weight gradient, so
the convention over-counts what stage 1 must compute by up to a third: the figure is
comparable across models, not a measure of wasted work.

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


def _allocation(shape: dict) -> list[int]:
    """The published allocation, cut to the layers of a shortened model (`--layers`)."""
    return ALLOCATION[: shape["num_hidden_layers"]]


def build_layermoe(shape: dict, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from layermoe.modeling import upcycle
    from layermoe.training.loop import freeze_for_stage

    config = Qwen2Config(**_shape_kwargs(shape), max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=False)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = upcycle(base, [n - 1 for n in _allocation(shape)], top_k=2, inplace=True)
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


def active_matmul_parameters(model, top_k: int = 2) -> int:
    """Parameters one token passes through: all but the input embedding and the experts top-k skips."""
    total = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if getattr(model.config, "tie_word_embeddings", False):
        total += model.get_input_embeddings().weight.numel()  # the lm_head matmul still runs
    if model.config.model_type == "layermoe":
        per_expert = 3 * model.config.hidden_size * model.config.intermediate_size
        skipped = sum(max(0, n - min(top_k, n)) for n in model.config.experts_per_layer) * per_expert
    else:  # Mixtral: every layer has num_local_experts experts
        per_expert = 3 * model.config.hidden_size * model.config.intermediate_size
        n = model.config.num_local_experts
        skipped = model.config.num_hidden_layers * max(0, n - min(top_k, n)) * per_expert
    return total - skipped


def flops_per_token(active: int, layers: int, hidden: int, seq: int) -> float:
    return 6 * active + 12 * layers * hidden * seq


def _step(kind: str, model, input_ids, optimizer, top_k: int = 2):
    from layermoe.training.losses import load_balancing_over_layers

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
    active = active_matmul_parameters(model)
    queue.put(
        dict(model=kind, params_b=sum(p.numel() for p in model.parameters()) / 1e9, active_b=active / 1e9,
             flops_per_token=flops_per_token(active, shape["num_hidden_layers"], shape["hidden_size"], shape["seq"]),
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
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (a quicker smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU for MFU (default: 989.4 on H100/H200, else no MFU)")
    args = parser.parse_args()
    shape = SMALL if args.small else FULL
    if args.layers:
        shape = dict(shape, num_hidden_layers=min(args.layers, len(ALLOCATION)))
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
    peak = args.peak_tflops or _datasheet_peak_tflops(args.device)
    gpu = torch_device_name(args.device)
    print(f"stage-1 training, {'small' if args.small else 'Qwen1.5-1.8B'} shapes, {gpu}, bf16, {shape['batch']} x {shape['seq']} = {tokens} tokens/step, {steps} steps")
    print("| model | params (B) | active (B) | trainable (B) | tokens/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "LayerMoE (published allocation, 72 experts)" if r["model"] == "layermoe" else "Mixtral 3 experts x 24, grouped_mm"
        mfu = f"{100 * r['tokens_per_s'] * r['flops_per_token'] / (peak * 1e12):.1f}%" if peak else "—"
        print(f"| {name} | {r['params_b']:.3f} | {r['active_b']:.3f} | {r['trainable_b']:.3f} | {r['tokens_per_s']:.0f} | {mfu} | {r['peak_gib']:.2f} |")
    if len(rows) == 2:
        ours, theirs = rows
        print(f"\nLayerMoE / Mixtral: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s, "
              f"{ours['peak_gib'] / theirs['peak_gib']:.2f}x peak memory (target: >= 1.5x tokens/s at <= 1.0x memory)")


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _datasheet_peak_tflops(device: str) -> float | None:
    """Dense bf16 peak from the datasheet, for the cards this project is measured on."""
    name = torch_device_name(device)
    return 989.4 if ("H100" in name or "H200" in name) else None


if __name__ == "__main__":
    main()
