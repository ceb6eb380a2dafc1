"""How much probability a vocabulary-extended model gives its new tokens where the text is old.

Old-language text tokenizes to old ids only (the vocabulary step checks that), so every
probability the model puts on a new token at an old-language position is wasted. Masking the
new tokens' logits there (renormalising over the old vocabulary) would gain exactly
    Σ_positions −log2(1 − m_i) / bytes   bits per byte,
where m_i is the new tokens' probability mass at position i. This script measures m on the
held-out text of each language of a generation, for the checkpoints of a work dir, and prints
that exact gain, which is what decides whether masking (or training the new rows in stage 2
to push that mass down) is worth building:

    python bench/vocab_mass.py WORKDIR [--generation 1] [--max-tokens 4000]

WORKDIR is a work dir whose generation ran `expand --new-tokens N` (e.g.
`<workdir>/compare/layermoe-vocab` after `layermoe compare compare-vocab`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from layermoe.core.workdir import Workdir
from layermoe.evaluation.bpb import pad_id_of
from layermoe.evaluation.windows import batches, pad_batch, score_plan
from layermoe.pipeline.common import documents_for_tokens, load_recorded_checkpoint, texts_for


@torch.inference_mode()
def new_token_mass(model, tokenizer, texts: list[str], new_ids: range, max_tokens: int) -> dict:
    """Mean new-token mass over scored positions, and the exact bits per byte masking would gain."""
    plan = score_plan(tokenizer, texts, max_length=256, max_tokens=max_tokens)
    mass_sum = gain_bits = 0.0
    positions = 0
    for batch in batches(plan.windows, 8):
        input_ids, attention_mask, targets = pad_batch(batch, pad_id_of(tokenizer))
        probabilities = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().softmax(-1)  # [B, L, V]
        mass = probabilities[..., new_ids.start:new_ids.stop].sum(-1)[targets != -100]  # [positions]
        mass_sum += float(mass.sum())
        gain_bits += float(-torch.log2((1 - mass).clamp_min(1e-12)).sum())
        positions += mass.numel()
    return {"positions": positions, "bytes": plan.bytes, "mean_mass": mass_sum / max(positions, 1),
            "masking_gain_bpb": gain_bits / max(plan.bytes, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=4000)
    args = parser.parse_args()
    workdir = Workdir(args.workdir)
    manifest = workdir.load()
    generation = manifest.generations[args.generation]
    checkpoints = {"after expand": generation.expansion.checkpoint,
                   "after stage 1": generation.stage1.checkpoint, "after stage 2": generation.stage2.checkpoint}
    results = {}
    for moment, checkpoint in checkpoints.items():
        if not checkpoint:
            continue
        model, tokenizer = load_recorded_checkpoint(workdir, manifest, checkpoint)
        sizes = model.config.vocab_sizes
        new_ids = range(sizes[args.generation - 1], sizes[args.generation])
        for lang in generation.languages:
            texts = texts_for(workdir, generation, lang, "heldout", limit=documents_for_tokens(args.max_tokens))
            figures = new_token_mass(model, tokenizer, texts, new_ids, args.max_tokens)
            results.setdefault(moment, {})[lang] = figures
            if lang in generation.old_languages:
                print(f"{moment:>14} {lang} (old): new-token mass {figures['mean_mass']:.4%} per position, "
                      f"masking it would gain {figures['masking_gain_bpb']:.4f} bits per byte")
            else:  # where the new tokens belong: the mass is wanted there, no mask applies
                print(f"{moment:>14} {lang} (new): new-token mass {figures['mean_mass']:.2%} per position")
        del model
    print(json.dumps(results, indent=2))
    if not math.isfinite(sum(f["mean_mass"] for r in results.values() for f in r.values())):
        raise SystemExit("a mass is not finite")


if __name__ == "__main__":
    main()
