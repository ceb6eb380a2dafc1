"""New-language words counted as tuples of the current tokens (the `tokenizers` pipeline itself,
multi-threaded), and the old-language constraints: which adjacent pairs a new merge may never join."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from layermoe.vocabulary.kinds import BATCH_DOCS, REPORT_SAMPLE_DOCS, SPACE_MARK, TokenizerInfo

# ---------------------------------------------------------------------------------------------
# Small helpers around `tokenizers`


def tokenizer_from_json(tokenizer_json: dict) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tokenizer_json, ensure_ascii=False))


def model_only_tokenizer(tokenizer: dict | Tokenizer) -> Tokenizer:
    """The BPE model alone (shared, not copied): encodes one pre-token already in the model's
    alphabet ("Ġword", "▁word"), with no normaliser, pre-tokeniser or added tokens."""
    if isinstance(tokenizer, dict):
        tokenizer = tokenizer_from_json(tokenizer)
    return Tokenizer(tokenizer.model)


def text_batches(texts: Iterable[str], size: int = BATCH_DOCS) -> Iterable[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pretoken_groups(encoding, added_ids: set[int]) -> list[list[int]]:
    """The token ids of each pre-token of one encoding (added tokens are never part of a word)."""
    ids, words = encoding.ids, encoding.word_ids
    groups, current, current_word = [], [], object()
    for token_id, word in zip(ids, words):
        if token_id in added_ids:
            if current:
                groups.append(current)
            current, current_word = [], object()
            continue
        if word != current_word and current:
            groups.append(current)
            current = []
        current.append(token_id)
        current_word = word
    if current:
        groups.append(current)
    return groups


class _WordSplitter:
    """Cuts SentencePiece-style pre-tokens (often the whole text) into words: before a token that
    starts with ▁ when the previous token ends with something else. No new token may span such a
    cut (TokenShape), so the pieces evolve independently and can be counted as words."""

    def __init__(self, info: TokenizerInfo):
        self.enabled = info.byte_fallback
        self.starts_space = {i for i, t in info.id_to_token.items() if t.startswith(SPACE_MARK)}
        self.ends_space = {i for i, t in info.id_to_token.items() if t.endswith(SPACE_MARK)}

    def split(self, group: list[int]) -> list[list[int]]:
        if not self.enabled or len(group) < 2:
            return [group]
        pieces, start = [], 0
        for k in range(1, len(group)):
            if group[k] in self.starts_space and group[k - 1] not in self.ends_space:
                pieces.append(group[start:k])
                start = k
        pieces.append(group[start:])
        return pieces


# ---------------------------------------------------------------------------------------------
# Counting the new languages' words


@dataclass
class LanguageCounts:
    words: Counter  # tuple of current token ids -> occurrences
    docs: int = 0
    bytes: int = 0
    budget_reached: bool = False
    sample: list[str] = field(default_factory=list)  # first documents, to measure the train side


def count_words(tokenizer: Tokenizer, info: TokenizerInfo, texts: Iterable[str], max_bytes: int) -> LanguageCounts:
    """Word counts of one language, reading at most `max_bytes` of text; memory grows with distinct words only."""
    counts = LanguageCounts(Counter())
    splitter = _WordSplitter(info)

    def limited():
        for text in texts:
            if not text:
                continue
            if counts.bytes >= max_bytes:
                counts.budget_reached = True
                return
            counts.docs += 1
            counts.bytes += len(text.encode("utf-8"))
            if len(counts.sample) < REPORT_SAMPLE_DOCS:
                counts.sample.append(text)
            yield text

    for batch in text_batches(limited()):
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            for group in _pretoken_groups(encoding, info.added_ids):
                for word in splitter.split(group):
                    counts.words[tuple(word)] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# What the old languages forbid


@dataclass
class OldConstraints:
    adjacent_pairs: set[tuple[int, int]]  # adjacent in an old pre-token's final tokenization
    pretoken_strings: set[str]  # multi-token old pre-tokens, as strings (ignore_merges only)
    characters: set[str]  # every character of the normalised old texts (byte fallback only)
    docs: int


def old_language_constraints(tokenizer: Tokenizer, info: TokenizerInfo, old_texts: Mapping[str, Sequence[str]]) -> OldConstraints:
    """Everything a new token must avoid so that no old check text changes."""
    pairs: set[tuple[int, int]] = set()
    pretokens: set[str] = set()
    chars: set[str] = set()
    docs = 0
    normalizer = tokenizer.normalizer
    for texts in old_texts.values():
        for batch in text_batches(texts):
            docs += len(batch)
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                for group in _pretoken_groups(encoding, info.added_ids):
                    pairs.update(zip(group, group[1:]))
                    if info.ignore_merges and len(group) > 1:
                        pretokens.add("".join(info.id_to_token[i] for i in group))
            if info.byte_fallback:
                for text in batch:
                    chars.update(normalizer.normalize_str(text) if normalizer else text)
    return OldConstraints(pairs, pretokens, chars, docs)


# ---------------------------------------------------------------------------------------------
# The BPE continuation
