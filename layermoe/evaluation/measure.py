"""One forward pass per batch for everything `eval` reports: bits per byte and routing health.

The windows are those of `windows.py`. With routing, every document token is fed as an input
(`every_input`: the last token is an input with no target), because routing counts every
token while bits per byte scores every prediction; the scored targets, hence bits per byte,
are the same either way. The router and classifier logits come out of the same forward
(`output_router_logits=True`), so an expanded model is run once over the texts, not twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from layermoe.core.errors import LayermoeError
from layermoe.evaluation.bpb import LanguageEval, bits_per_byte, model_device, nll_of_logits, pad_id_of
from layermoe.evaluation.routing import LanguageRouting, RoutingRecorder
from layermoe.evaluation.windows import batches, default_max_length, pad_batch, score_plan


@dataclass
class Measurement:
    languages: dict[str, LanguageEval]
    routing: dict[str, LanguageRouting] = field(default_factory=dict)  # per language; empty without routing


def measure_languages(
    model,
    tokenizer,
    texts_by_language: dict[str, list[str]],
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    max_length: int | None = None,
    routing_generation: dict[str, int | None] | None = None,
    top_k: int | None = None,
) -> Measurement:
    """Bits per byte of each language's texts and, with `routing_generation`, its routing counts.

    `routing_generation` maps each language to its generation (the classifier's label; None
    counts the routing but not the classifier's accuracy); it needs an expanded layermoe model.
    Sum the parts with `routing.summarise_routing`. Other arguments as `evaluate_languages`.
    """
    max_length = max_length or default_max_length(model)
    device = torch.device(device) if device is not None else model_device(model)
    pad_id = pad_id_of(tokenizer)
    recorder = RoutingRecorder(model, top_k) if routing_generation is not None else None
    was_training = model.training
    model.eval()
    measured = Measurement(languages={})
    try:
        for language, texts in texts_by_language.items():
            plan = score_plan(tokenizer, texts, max_length=max_length, max_tokens=max_tokens,
                              every_input=recorder is not None)
            if plan.tokens == 0:
                raise LayermoeError(f"language '{language}' has no held-out text to evaluate: give it at least one non-empty document")
            part = None
            if recorder is not None:
                part = measured.routing[language] = recorder.new_part()
                part.tokens = plan.tokens
            nll, scored = 0.0, 0
            for batch in batches(plan.windows, batch_size):
                input_ids, attention_mask, targets = pad_batch(batch, pad_id)
                with torch.inference_mode():
                    if recorder is None:
                        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                    else:
                        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       output_router_logits=True)
                        keep = recorder.kept_tokens(batch, attention_mask, device)
                        recorder.record(part, output, keep, routing_generation.get(language))
                    nll += nll_of_logits(output.logits, targets.to(device))
                scored += int((targets != -100).sum())
                if progress is not None:
                    progress(language, scored, plan.tokens)
            measured.languages[language] = LanguageEval(
                bpb=bits_per_byte(nll, plan.bytes),
                token_ppl=math.exp(nll / plan.tokens),
                tokens=plan.tokens,
                bytes=plan.bytes,
                nll_nats=nll,
                documents=plan.documents,
            )
    finally:
        model.train(was_training)
    return measured


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
    return measure_languages(model, tokenizer, texts_by_language, max_tokens=max_tokens, batch_size=batch_size,
                             device=device, progress=progress, max_length=max_length).languages
