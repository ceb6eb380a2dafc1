"""Cost of `profile_model` against a bare forward pass over the same tokens and batches.

    python bench/profile_bench.py                       # tiny 8-layer hidden-256 llama, CPU
    python bench/profile_bench.py --model PATH --device cuda --tokens 100000

Prints a markdown table: tokens/s, overhead of the profile over the bare forward (target
< 20%), and peak memory (CPU: peak RSS of a fresh process per mode; CUDA: max allocated).
The bare forward runs exactly the batches `profile_model` builds, with the same kwargs.
Two profile modes: similarity only (`--neuron-top-n 0`) and with the language-specific neuron
count (NeuronMoE; the default of `layermoe profile`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from layermoe.profiling.similarity import _batches, _forward_kwargs, _max_length, profile_model, sample_sequences

LANGUAGES = ("en", "el", "tr")


def corpus(languages=LANGUAGES) -> dict[str, list[str]]:
    from layermoe.data import builtin_corpus_path

    out: dict[str, list[str]] = {lang: [] for lang in languages}
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        for line in f:
            lang, _, text = line.rstrip("\n").partition("\t")
            if lang in out:
                out[lang].append(text)
    return out


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model
    if path is None:
        from layermoe.testing import make_tiny_model

        path = make_tiny_model(
            tempfile.mkdtemp(), "llama", num_layers=8, hidden_size=256, intermediate_size=704,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        )
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def bare_forward(model, tokenizer, texts, args) -> tuple[int, float]:
    """The forward passes profile_model makes, without hooks or accumulation (batches built
    beforehand, so tokenization is charged to the profile only). Returns (tokens, seconds)."""
    device = model.get_input_embeddings().weight.device
    kwargs = _forward_kwargs(model)
    max_length = min(_max_length(model), args.batch_tokens)
    pad = tokenizer.pad_token_id or 0
    batches = []
    for lang, docs in texts.items():
        seqs = sample_sequences(tokenizer, docs, args.tokens, args.seed, max_length, lang)
        for batch in _batches(seqs, args.batch_tokens):
            ids = torch.full((len(batch), len(batch[0])), pad)
            att = torch.zeros_like(ids)
            for r, s in enumerate(batch):
                ids[r, : len(s)], att[r, : len(s)] = torch.tensor(s), 1
            batches.append((ids.to(device), att.to(device)))
    _sync(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        for ids, att in batches:
            model(input_ids=ids, attention_mask=att, **kwargs)
    _sync(args.device)
    return int(sum(att.sum() for _, att in batches)), time.perf_counter() - start


def profile(model, tokenizer, texts, args, neuron_top_n=0):
    _sync(args.device)
    start = time.perf_counter()
    result = profile_model(model, tokenizer, texts, args.tokens, args.batch_tokens, seed=args.seed,
                           neuron_top_n=neuron_top_n, neuron_documents=args.neuron_docs)
    _sync(args.device)
    return sum(result.tokens_per_language.values()), time.perf_counter() - start


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_mode(args) -> None:
    """Run one mode in this (fresh) process and print its peak memory as JSON."""
    model, tok = load(args)
    texts = corpus()
    if str(args.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    MODES[args.mode](model, tok, texts, args)
    print(json.dumps({"peak_mb": peak_memory_mb(args.device)}))


MODES = {
    "bare": bare_forward,
    "profile": lambda model, tok, texts, args: profile(model, tok, texts, args, neuron_top_n=0),
    "neurons": lambda model, tok, texts, args: profile(model, tok, texts, args, neuron_top_n=args.neuron_top_n),
}
LABELS = {"bare": "bare forward", "profile": "profile, similarity only", "neurons": "profile + neuron count"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: a tiny 8-layer hidden-256 llama)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per language")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neuron-top-n", type=int, default=1000)
    p.add_argument("--neuron-docs", type=int, default=500)
    p.add_argument("--mode", choices=tuple(MODES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return one_mode(args)

    torch.manual_seed(0)
    model, tok = load(args)
    texts = corpus()
    for fn in MODES.values():  # warm-up
        fn(model, tok, texts, args)
    times = {mode: [] for mode in MODES}
    tokens = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every mode alike
        for mode, fn in MODES.items():
            n, seconds = fn(model, tok, texts, args)
            tokens[mode] = n
            times[mode].append(seconds)

    peaks = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode] + [
            a for a in sys.argv[1:] if not a.startswith("--mode")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[mode] = json.loads(out)["peak_mb"]

    cfg = model.config
    print(f"\nmodel: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"device {args.device}, {args.dtype}, {len(texts)} languages x {args.tokens} tokens, "
          f"batch_tokens {args.batch_tokens}, best and median of {args.repeats}\n")
    best = {m: min(t) for m, t in times.items()}
    med = {m: statistics.median(t) for m, t in times.items()}
    mem = "peak RSS MiB" if args.device == "cpu" else "peak allocated MiB"
    print(f"| run | tokens | best s | tokens/s (best) | tokens/s (median) | {mem} |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        print(f"| {LABELS[mode]} | {tokens[mode]} | {best[mode]:.3f} | {tokens[mode] / best[mode]:,.0f} | "
              f"{tokens[mode] / med[mode]:,.0f} | {peaks[mode]:,.0f} |")
    for mode in ("profile", "neurons"):
        print(f"\noverhead of {LABELS[mode]}: {100 * (best[mode] / best['bare'] - 1):+.1f}% (best), "
              f"{100 * (med[mode] / med['bare'] - 1):+.1f}% (median); target < 20%")


if __name__ == "__main__":
    main()
