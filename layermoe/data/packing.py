"""Packed blocks over prepared data: read-only, memory-mapped, computed per batch.

A prepared directory (written by `prepare.py`) holds
    tokens.bin        every kept document's token ids, one after another, language by
                      language in `meta.json`'s order; uint16 (vocabulary <= 65,536) or uint32
    lengths.npy       int32, the length of each document, in the same order
    order.npy         the packing order: `default_rng(seed).permutation(number of documents)`
    meta.json         languages, their generations, counts, settings, the cache key

Packing: the documents, taken in `order`, form one stream of tokens (each ends with EOS); the
stream is cut into blocks of seq_len tokens. Attention crosses document boundaries inside a
block, as in GPT-style pretraining. The last, partial block is kept and right-padded
(attention_mask 0, no loss on the padding), so no document is dropped.

Nothing per token is stored besides the ids: a token's language (and so its generation) is
that of its document, found from the document boundaries with a binary search. Blocks are
not materialised either: `arrays()` gathers the ids of any set of blocks with a few vectorised
numpy operations, so any seq_len reads the same prepared data, and every rank only maps it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from layermoe.core.errors import LayermoeError

IGNORE = -100  # the label cross-entropy skips (transformers' convention; training.losses.IGNORE)
FORMAT_VERSION = 1


@dataclass
class PreparedData:
    """A prepared directory, memory-mapped."""

    path: Path
    meta: dict
    tokens: np.ndarray  # memmap, flat ids
    lengths: np.ndarray  # memmap, int32 per document
    order: np.ndarray  # memmap, packing order

    @property
    def languages(self) -> list[str]:
        return list(self.meta["languages"])

    @property
    def generation_of_language(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.meta["generation_of_language"].items()}

    @property
    def documents_per_language(self) -> dict[str, int]:
        return {s["language"]: s["documents"] for s in self.meta["stats"]}

    @property
    def tokens_per_language(self) -> dict[str, int]:
        return {s["language"]: s["tokens"] for s in self.meta["stats"]}

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])


def open_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LayermoeError(f"{path} holds no prepared data (no readable meta.json): run `layermoe prepare` again") from None
    if meta.get("format") != FORMAT_VERSION:
        raise LayermoeError(f"{path} was prepared by another layermoe version (format {meta.get('format')}): "
                            "run `layermoe prepare --force`")
    count = int(meta["num_documents"])
    tokens = (np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r") if meta["num_tokens"]
              else np.empty(0, np.dtype(meta["dtype"])))
    lengths = np.load(path / "lengths.npy", mmap_mode="r")
    order = np.load(path / "order.npy", mmap_mode="r")
    if len(tokens) != meta["num_tokens"] or len(lengths) != count or len(order) != count:
        raise LayermoeError(f"{path} is incomplete or damaged (sizes differ from meta.json): run `layermoe prepare --force`")
    return PreparedData(path, meta, tokens, lengths, order)


class PackedData:
    """Fixed-length blocks of a prepared directory, with per-token labels derived on the fly."""

    def __init__(self, prepared: PreparedData, seq_len: int, pad_id: int):
        if prepared.num_tokens == 0:
            raise LayermoeError(f"{prepared.path} holds no training tokens")
        self.prepared = prepared
        self.seq_len, self.pad_id = int(seq_len), int(pad_id)
        self.languages = prepared.languages
        self.generation_of_language = prepared.generation_of_language
        self.documents_per_language = prepared.documents_per_language
        self.tokens_per_language = prepared.tokens_per_language
        lengths = np.asarray(prepared.lengths, dtype=np.int64)
        order = np.asarray(prepared.order, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]  # [D] where each document starts in tokens.bin
        self._lengths = lengths
        self._order = order
        self._packed_ends = np.cumsum(lengths[order])  # [D] where the k-th packed document ends in the stream
        counts = [self.documents_per_language[lang] for lang in self.languages]
        self._language_ends = np.cumsum(counts)  # document index -> language by binary search
        self._generation = np.array([self.generation_of_language[lang] for lang in self.languages], dtype=np.int64)
        self.num_tokens = prepared.num_tokens
        self.num_blocks = -(-self.num_tokens // self.seq_len)

    def __len__(self) -> int:
        return self.num_blocks

    def arrays(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """int64 numpy arrays [B, L] for the given blocks: input_ids, generation, language
        (padding: pad_id, IGNORE, -1)."""
        blocks = np.asarray(indices, dtype=np.int64).reshape(-1)
        positions = blocks[:, None] * self.seq_len + np.arange(self.seq_len)  # [B, L] in the packed stream
        real = positions < self.num_tokens
        where = positions[real]
        packed = np.searchsorted(self._packed_ends, where, side="right")  # k-th packed document
        document = self._order[packed]
        offset = where - (self._packed_ends[packed] - self._lengths[document])  # position inside the document
        language = np.searchsorted(self._language_ends, document, side="right")
        input_ids = np.full(positions.shape, self.pad_id, dtype=np.int64)
        generation = np.full(positions.shape, IGNORE, dtype=np.int64)
        languages = np.full(positions.shape, -1, dtype=np.int64)
        input_ids[real] = self.prepared.tokens[self._starts[document] + offset]
        generation[real] = self._generation[language]
        languages[real] = language
        return {"input_ids": input_ids, "generation": generation, "language": languages}

    def real_tokens(self, indices: Sequence[int]) -> np.ndarray:
        """Non-padding tokens in each given block."""
        blocks = np.asarray(indices, dtype=np.int64).reshape(-1)
        return np.clip(self.num_tokens - blocks * self.seq_len, 0, self.seq_len)

    def batch(self, indices: Sequence[int]):
        """Tensors for the given blocks: input_ids, attention_mask, labels, generation, language, all [B, L]."""
        import torch

        arrays = self.arrays(indices)
        input_ids = torch.from_numpy(arrays["input_ids"])
        language = torch.from_numpy(arrays["language"])
        attention_mask = (language >= 0).long()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE),
            "generation": torch.from_numpy(arrays["generation"]),
            "language": language,
        }


@lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def block_indices(position: int, count: int, num_blocks: int, seed: int) -> np.ndarray:
    """Blocks `position .. position+count-1` of an endless stream of seeded epoch permutations.

    Epoch e visits every block once in the order `default_rng([seed, e]).permutation(num_blocks)`.
    Because it depends on the position alone, resuming at a saved position replays exactly
    the same data, and DDP ranks can slice one global batch without talking.
    """
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        epoch, offset = divmod(position + filled, num_blocks)
        perm = _epoch_permutation(seed, epoch, num_blocks)
        take = min(count - filled, num_blocks - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out
