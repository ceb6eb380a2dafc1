"""Continue a prompt with a loaded model: greedy or sampled, with the KV cache, streamed as it goes.

A thin layer over `model.generate`: one explicit GenerationConfig (so a checkpoint's own
generation_config.json, e.g. an instruct model's sampling defaults, does not change what
`--temperature 0` means) and a streamer that hands each finished piece of text to a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Continuation:
    prompt_ids: list[int]
    new_ids: list[int]  # the generated tokens, EOS included when the model stopped on it
    text: str  # the generated tokens decoded (special tokens and a character cut off at the end dropped)


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """TextStreamer's word-boundary buffering (no half characters), sent to a callback instead of print."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream_end:
                text = text.rstrip("\ufffd")  # the bytes of a character cut off by max_new_tokens
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def continue_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, use_cache: bool = True, stop_at_eos: bool = True,
                  on_text: Callable[[str], None] | None = None) -> Continuation:
    """Generate up to `max_new_tokens` after `prompt`. temperature 0 = greedy (deterministic).

    The prompt is tokenized as the tokenizer does by default (BOS where it adds one). `on_text`
    receives the continuation piece by piece as it is generated.
    """
    return continue_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, use_cache=use_cache, stop_at_eos=stop_at_eos, on_text=on_text)[0]


@torch.inference_mode()
def continue_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, use_cache: bool = True, stop_at_eos: bool = True,
                   on_text: Callable[[str], None] | None = None) -> list[Continuation]:
    """`continue_text` for several prompts in one batch (left-padded): one decoding step serves them all.

    Streaming (`on_text`) needs a single prompt. Rotary positions make a row's left padding
    harmless; float rounding may still differ from an unbatched run in the last bits.
    """
    from transformers import GenerationConfig

    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming (on_text) continues one prompt at a time")
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = padding_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        use_cache=use_cache,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        min_new_tokens=None if stop_at_eos else max_new_tokens,  # EOS masked out until the end
        bos_token_id=tokenizer.bos_token_id,
    )
    if sample:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            generation_config=config,
            streamer=_streamer(tokenizer, on_text) if on_text is not None else None,
        )
    finally:
        model.train(was_training)
    width = encoded["input_ids"].shape[1]
    continuations = []
    for row in range(len(prompts)):
        prompt_ids = encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist()
        new_ids = output[row, width:].tolist()
        if stop_at_eos and tokenizer.eos_token_id in new_ids:  # a finished row is padded up to the longest one
            new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(new_ids, skip_special_tokens=True).rstrip("\ufffd")
        continuations.append(Continuation(prompt_ids, new_ids, text))
    return continuations
