"""Turn held-out documents into scored token windows, with a byte count that matches them.

What counts (the definition behind every bits-per-byte figure layermoe reports):

- Each document is its own sequence. It is tokenized without special tokens and one start
  token is prepended: the tokenizer's BOS, or its EOS where there is no BOS (GPT-2 / Qwen
  style, where EOS is the document separator). So the first token of the document is
  predicted too, and *every* document token is scored exactly once. No EOS is appended or
  scored: the model is not asked where the document ends.
- Hence the bytes are exactly the document's UTF-8 bytes (`len(text.encode("utf-8"))`).
- A document longer than the context is cut into consecutive windows of `max_length`
  inputs; window w+1 starts with the last token of window w as its only context, so no token
  is scored twice and none is skipped (context resets at a window boundary; that costs a
  little bpb on very long documents and keeps the cost linear).
- `max_tokens` caps the scored tokens per language: documents are taken in order, and the
  one that crosses the cap is cut at the last token boundary that is also a character
  boundary, with the bytes of exactly that prefix (needs a fast tokenizer's offsets; a slow
  tokenizer drops the partial document instead). Empty documents are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from layermoe.core.errors import LayermoeError


@dataclass
class Window:
    inputs: list[int]  # [n] token ids fed to the model
    targets: list[int]  # [n] next-token ids scored at each input position
    starts_document: bool  # inputs[0] is the start token (not a token of the text)


@dataclass
class ScoredText:
    windows: list[Window]
    tokens: int  # scored tokens in all windows
    bytes: int  # UTF-8 bytes those tokens spell
    documents: int  # documents (whole or cut) that contributed


def start_token_id(tokenizer) -> int:
    """BOS, else EOS (the document separator of tokenizers without a BOS)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise LayermoeError(
        "the tokenizer has neither a BOS nor an EOS token, so a document's first token cannot be scored: "
        "set tokenizer.bos_token or tokenizer.eos_token"
    )


def _clean_prefix(offsets: list[tuple[int, int]], limit: int) -> int:
    """The largest k <= limit such that cutting after token k does not split a character."""
    for k in range(min(limit, len(offsets) - 1), 0, -1):
        # Tokens holding pieces of one multi-byte character share its character span.
        if offsets[k][0] >= offsets[k - 1][1]:
            return k
    return 0


def document_windows(doc_ids: list[int], start_id: int, max_length: int, every_input: bool = False) -> list[Window]:
    """Windows that score every token of `doc_ids` once, each seeing at most `max_length` inputs.

    With `every_input`, windows instead hold every token of the document as an input (its last
    token is an input with no target, -100), which is what routing statistics need.
    """
    sequence = [start_id] + doc_ids
    windows = []
    if every_input:
        for begin in range(0, len(sequence), max_length):
            inputs = sequence[begin : begin + max_length]
            targets = sequence[begin + 1 : begin + max_length + 1]
            windows.append(Window(inputs, targets + [-100] * (len(inputs) - len(targets)), begin == 0))
        return windows
    for begin in range(0, len(doc_ids), max_length):
        chunk = sequence[begin : begin + max_length + 1]
        windows.append(Window(inputs=chunk[:-1], targets=chunk[1:], starts_document=begin == 0))
    return windows


def score_plan(
    tokenizer, texts: list[str], max_length: int, max_tokens: int | None = None, every_input: bool = False
) -> ScoredText:
    """Tokenize `texts` into windows under the definition in this module's docstring.

    `every_input`: windows feed every document token as an input (for routing statistics).
    """
    if max_length < 1:
        raise LayermoeError(f"max_length must be at least 1 token, got {max_length}")
    if max_tokens is not None and max_tokens < 1:
        raise LayermoeError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    start_id = start_token_id(tokenizer)
    fast = bool(getattr(tokenizer, "is_fast", False))
    windows: list[Window] = []
    tokens = nbytes = documents = 0
    for text in texts:
        if not text:
            continue
        remaining = None if max_tokens is None else max_tokens - tokens
        if remaining is not None and remaining <= 0:
            break
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        ids = list(encoded["input_ids"])
        if not ids:
            continue
        text_bytes = len(text.encode("utf-8"))
        if remaining is not None and len(ids) > remaining:
            if not fast:
                break
            offsets = [tuple(o) for o in encoded["offset_mapping"]]
            keep = _clean_prefix(offsets, remaining)
            if keep == 0:
                break
            text_bytes = len(text[: offsets[keep - 1][1]].encode("utf-8"))
            ids = ids[:keep]
        windows.extend(document_windows(ids, start_id, max_length, every_input))
        tokens += len(ids)
        nbytes += text_bytes
        documents += 1
    return ScoredText(windows=windows, tokens=tokens, bytes=nbytes, documents=documents)


def texts_within_tokens(tokenizer, texts: list[str], max_tokens: int) -> list[str]:
    """The text that `score_plan(tokenizer, texts, ..., max_tokens)` scores, as strings.

    Documents in order; the one that crosses the cap is cut at the same clean token boundary.
    Scoring these texts in full with any other tokenizer measures every model on the same
    bytes: what a comparison across tokenizers (a vocabulary variant) needs.
    """
    if max_tokens < 1:
        raise LayermoeError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    kept: list[str] = []
    tokens = 0
    for text in texts:
        if not text:
            continue
        remaining = max_tokens - tokens
        if remaining <= 0:
            break
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        if not ids:
            continue
        if len(ids) > remaining:
            offsets = [tuple(o) for o in encoded["offset_mapping"]]
            keep = _clean_prefix(offsets, remaining)
            if keep:
                kept.append(text[: offsets[keep - 1][1]])
            break
        kept.append(text)
        tokens += len(ids)
    return kept


def batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Group windows of similar length (longest first) so padding stays small."""
    if batch_size < 1:
        raise LayermoeError(f"batch_size must be at least 1, got {batch_size}")
    ordered = sorted(windows, key=lambda w: len(w.inputs), reverse=True)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def pad_batch(batch: list[Window], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, targets (pad positions hold -100), [B, L] each."""
    import torch

    length = max(len(w.inputs) for w in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    targets = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, w in enumerate(batch):
        n = len(w.inputs)
        input_ids[row, :n] = torch.tensor(w.inputs)
        attention_mask[row, :n] = 1
        targets[row, :n] = torch.tensor(w.targets)
    return input_ids, attention_mask, targets


def default_max_length(model, cap: int = 2048) -> int:
    """The model's context, capped: longer windows only cost memory for held-out sentences."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or cap
    return int(min(context, cap))
