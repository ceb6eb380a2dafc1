"""Greedy decoding with the KV cache: an expanded model's tokens/s against its dense base.

Random weights at real shapes (SmolLM2-135M's and Qwen1.5-1.8B's), upcycled with the
allocation the project ships for each (the demo's 30 new experts over SmolLM2's 30 layers;
the published G1 allocation for Qwen1.5-1.8B, 72 experts over 24 layers), top-2, routing
classifiers on the most similar layers, bf16 on CUDA. Every sequence decodes exactly
`--new-tokens` tokens (no early stop). Target: the expanded model at least 0.8x the base.

    python bench/decode.py                          # CUDA, both shapes, batch 1 and 32
    python bench/decode.py --device cpu --small     # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# An allocation shaped like the demo's G1 over SmolLM2-135M's 30 layers (30 new experts), and the paper's
# published Qwen1.5-1.8B G1 totals (48 new experts); classifiers on the last layers listed.
SMOLLM2 = dict(name="SmolLM2-135M", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, model_type="llama",
               new_experts=[3, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 3],
               classifier_layers=[9, 10, 11, 12, 23, 24, 25, 26, 27])
QWEN = dict(name="Qwen1.5-1.8B", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=False, model_type="qwen2",
            new_experts=[n - 1 for n in [5, 4, 3, 5, 4, 3, 2, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3]],
            classifier_layers=[6, 9, 10, 11, 12, 13, 14])
SMALL = dict(name="small", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False, model_type="llama",
             new_experts=[2, 1, 0, 3], classifier_layers=[3])


def build(shape: dict, device: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from layermoe.modeling import upcycle

    kwargs = {k: v for k, v in shape.items() if k not in ("name", "new_experts", "classifier_layers", "model_type")}
    config = AutoConfig.for_model(shape["model_type"], **kwargs, max_position_embeddings=4096, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    expanded = upcycle(base, shape["new_experts"], classifier_layers=shape["classifier_layers"]).eval()
    return base, expanded


@torch.inference_mode()
def tokens_per_second(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device: str, repeats: int) -> float:
    prompt = torch.randint(2, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    mask = torch.ones_like(prompt)
    model.generate(prompt, attention_mask=mask, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, **settings)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    ap.add_argument("--shapes", default="smollm2,qwen", help="comma-separated: smollm2, qwen")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --small)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median reported (default 3, 1 with --small)")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shapes = [SMALL] if args.small else [{"smollm2": SMOLLM2, "qwen": QWEN}[s] for s in args.shapes.split(",")]
    new_tokens = args.new_tokens or (16 if args.small else 128)
    repeats = args.repeats or (1 if args.small else 3)
    batches = [int(b) for b in args.batches.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"greedy decoding with KV cache, {name}, {str(dtype).replace('torch.', '')}, prompt {args.prompt_tokens} tokens, "
          f"{new_tokens} new tokens per sequence, median of {repeats}\n")
    print("| shapes | experts (new) | batch | dense base tok/s | expanded tok/s | expanded / base |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        base, expanded = build(shape, args.device, dtype)
        experts = f"{len(shape['new_experts']) + sum(shape['new_experts'])} ({sum(shape['new_experts'])})"
        for batch in batches:
            dense = tokens_per_second(base, batch, args.prompt_tokens, new_tokens, shape["vocab_size"], args.device, repeats)
            moe = tokens_per_second(expanded, batch, args.prompt_tokens, new_tokens, shape["vocab_size"], args.device, repeats)
            print(f"| {shape['name']} | {experts} | {batch} | {dense:,.0f} | {moe:,.0f} | {moe / dense:.2f} |", flush=True)
        del base, expanded
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
