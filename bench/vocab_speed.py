"""Training and generation speed in text, not tokens: LayerMoE beside LayerMoE + vocabulary.

Tokens per second hides how much text a token holds. This loads the two final models of a
`layermoe compare compare-vocab` run and, in turn (A B A B ..., so a busy machine slows both
alike), times on the same held-out text of the new languages:

- a stage-1 training step (forward and backward of the stage-1 trainable set: the new experts,
  and for the vocabulary model its new embedding rows; batch 4 x 128 tokens of each model's own
  tokenization): bytes of text per second;
- greedy generation of 48 tokens from the same prompt: characters per second.

    python bench/vocab_speed.py COMPARE_WORKDIR [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from layermoe.core.workdir import Workdir
from layermoe.modeling import parameter_groups
from layermoe.modeling.generation import continue_text
from layermoe.pipeline.common import load_recorded_checkpoint, texts_for

BATCH, SEQ_LEN, NEW_TOKENS = 4, 128, 48


def load(workdir: Workdir):
    manifest = workdir.load()
    model, tokenizer = load_recorded_checkpoint(workdir, manifest, manifest.generations[1].stage2.checkpoint)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(False)
    groups = parameter_groups(model)
    trainable = set(groups.get("experts_g1", []))
    if getattr(model.config, "vocab_sizes", None):
        trainable.add("lm.model.embed_tokens.weight")  # its old rows are masked in training; the cost is the same
    for name, parameter in model.named_parameters():
        if name in trainable:
            parameter.requires_grad_(True)
    return manifest, model, tokenizer


def batch_of(tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """[BATCH, SEQ_LEN] token ids of the text's opening, and the UTF-8 bytes they spell."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    needed = BATCH * SEQ_LEN
    if len(encoded["input_ids"]) < needed:
        raise SystemExit(f"the held-out text has only {len(encoded['input_ids'])} tokens, {needed} needed")
    ids = torch.tensor(encoded["input_ids"][:needed]).view(BATCH, SEQ_LEN)
    return ids, len(text[: encoded["offset_mapping"][needed - 1][1]].encode("utf-8"))


def train_step_seconds(model, ids: torch.Tensor) -> float:
    model.train()
    began = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - began
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_workdir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = args.compare_workdir / "compare"
    models = {name: load(Workdir(root / name)) for name in ("layermoe", "layermoe-vocab")}
    manifest = models["layermoe"][0]
    generation = manifest.generations[1]
    text = " ".join(t for lang in generation.new_languages
                    for t in texts_for(Workdir(root / "layermoe"), generation, lang, "heldout"))
    prompt = " ".join(texts_for(Workdir(root / "layermoe"), generation, generation.new_languages[0], "heldout")[0].split()[:6])
    batches = {name: batch_of(tokenizer, text) for name, (_, _, tokenizer) in models.items()}
    timings = {name: {"train": [], "generate": [], "characters": 0} for name in models}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, (_, model, tokenizer) in models.items():
            train = train_step_seconds(model, batches[name][0])
            model.eval()
            began = time.perf_counter()
            continuation = continue_text(model, tokenizer, prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
            generate = time.perf_counter() - began
            if repeat:
                timings[name]["train"].append(train)
                timings[name]["generate"].append(generate)
                timings[name]["characters"] = len(continuation.text)
    print(f"| model | text bytes per training batch ({BATCH} x {SEQ_LEN} tokens) | training step (median s) | "
          f"training text, bytes/s | generated characters ({NEW_TOKENS} tokens) | generation, characters/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, figures in timings.items():
        train, generate = statistics.median(figures["train"]), statistics.median(figures["generate"])
        print(f"| {name} | {batches[name][1]:,} | {train:.2f} | {batches[name][1] / train:,.0f} | "
              f"{figures['characters']} | {figures['characters'] / generate:.1f} |")


if __name__ == "__main__":
    main()
