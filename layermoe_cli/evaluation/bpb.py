"""Held-out bits per UTF-8 byte per language: the tokenizer-independent headline figure.

    bpb = (sum of next-token NLL in nats) / ln 2 / (UTF-8 bytes of the scored text)

Which tokens and bytes count is defined once, in `evaluation/windows.py`. Token perplexity
exp(NLL / tokens) is reported too, but only bpb compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from layermoe_cli.errors import LayermoeError
from layermoe_cli.evaluation.windows import batches, default_max_length, pad_batch, score_plan


@dataclass
class LanguageEval:
    bpb: float  # bits per UTF-8 byte
    token_ppl: float  # exp(mean NLL per scored token)
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes those tokens spell
    nll_nats: float  # summed next-token NLL
    documents: int

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_byte(nll_nats: float, nbytes: int) -> float:
    return nll_nats / math.log(2) / nbytes


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_id_of(tokenizer) -> int:
    # Pad positions are masked out, so any valid id works; prefer the tokenizer's own.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return int(token_id)
    return 0


@torch.inference_mode()
def summed_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over positions whose target is not -100. All tensors [B, L]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
    total = 0.0
    # One row at a time in fp32: a full [B, L, V] fp32 copy is gigabytes at a 150k vocabulary.
    for row in range(logits.shape[0]):
        keep = targets[row] != -100
        row_logits = logits[row][keep].float()  # [n, V]
        log_probs = torch.log_softmax(row_logits, dim=-1)
        picked = log_probs.gather(-1, targets[row][keep].unsqueeze(-1))  # [n, 1]
        total -= picked.double().sum().item()
    return total


def evaluate_languages(
    model,
    tokenizer,
    texts_by_language: dict[str, list[str]],
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    max_length: int | None = None,
) -> dict[str, LanguageEval]:
    """Bits per byte, token perplexity and counts for each language's held-out texts.

    `max_tokens` caps the scored tokens per language; `max_length` is the window length
    (default: the model's context, at most 2048). `progress(language, scored, total)` is
    called after every batch. The model is put in eval mode and given back in its old mode.
    """
    max_length = max_length or default_max_length(model)
    device = torch.device(device) if device is not None else model_device(model)
    pad_id = pad_id_of(tokenizer)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for language, texts in texts_by_language.items():
            plan = score_plan(tokenizer, texts, max_length=max_length, max_tokens=max_tokens)
            if plan.tokens == 0:
                raise LayermoeError(f"language '{language}' has no held-out text to evaluate: give it at least one non-empty document")
            nll = 0.0
            scored = 0
            for batch in batches(plan.windows, batch_size):
                input_ids, attention_mask, targets = (t.to(device) for t in pad_batch(batch, pad_id))
                nll += summed_nll(model, input_ids, attention_mask, targets)
                scored += sum(len(w.targets) for w in batch)
                if progress is not None:
                    progress(language, scored, plan.tokens)
            results[language] = LanguageEval(
                bpb=bits_per_byte(nll, plan.bytes),
                token_ppl=math.exp(nll / plan.tokens),
                tokens=plan.tokens,
                bytes=plan.bytes,
                nll_nats=nll,
                documents=plan.documents,
            )
    finally:
        model.train(was_training)
    return results
