"""Held-out bits per UTF-8 byte per language: the tokenizer-independent headline figure.

    bpb = (sum of next-token NLL in nats) / ln 2 / (UTF-8 bytes of the scored text)

Which tokens and bytes count is defined once, in `evaluation/windows.py`; the loop that
scores them is `evaluation/measure.py`. Token perplexity
exp(NLL / tokens) is reported too, but only bpb compares models with different tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


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


def nll_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over positions whose target is not -100. logits [B, L, V], targets [B, L]."""
    total = 0.0
    # One row at a time in fp32: a full [B, L, V] fp32 copy is gigabytes at a 150k vocabulary.
    for row in range(logits.shape[0]):
        keep = targets[row] != -100
        row_logits = logits[row][keep].float()  # [n, V]
        log_probs = torch.log_softmax(row_logits, dim=-1)
        picked = log_probs.gather(-1, targets[row][keep].unsqueeze(-1))  # [n, 1]
        total -= picked.double().sum().item()
    return total


@torch.inference_mode()
def summed_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log p(target) over positions whose target is not -100. All tensors [B, L]."""
    return nll_of_logits(model(input_ids=input_ids, attention_mask=attention_mask).logits, targets)
