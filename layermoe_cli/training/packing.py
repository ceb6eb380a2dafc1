"""Training data: pick documents, tokenise once (cached), pack to fixed-length blocks.

Every token carries two labels through packing, aligned position by position with
input_ids: its language's generation (0 = G0/old, ... current = new) and the language's
index. Padding has generation IGNORE (-100) and language -1.

Packing: documents of all languages are shuffled together (seeded), each ends with EOS,
and the stream is cut into blocks of seq_len tokens. Attention crosses document
boundaries inside a block, as in GPT-style pretraining. The last, partial block is kept
and right-padded (attention_mask 0, no next-token or auxiliary loss on the padding), so no
document is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layermoe_cli.errors import LayermoeError
from layermoe_cli.training.config import TrainConfig
from layermoe_cli.training.losses import IGNORE

_WRITE_BATCH = 1024  # blocks per Arrow record batch


# ---------------------------------------------------------------- choosing documents


def select_documents(
    texts_by_language: Mapping[str, Sequence[str]],
    generation_of_language: Mapping[str, int],
    current_generation: int,
    config: TrainConfig,
) -> dict[str, list[str]]:
    """The documents a stage trains on, per language (deterministic for a seed).

    Stage 1: the current generation's languages only. Stage 2: those plus a replay of every
    earlier generation's languages. New languages are capped at `docs_per_new_language`; old
    ones at `docs_per_old_language`, or by default `replay_ratio` x the mean number of
    new-language documents (authors: 100k new, 50k old). Empty documents are skipped.
    """
    unknown = sorted(set(texts_by_language) - set(generation_of_language))
    if unknown:
        raise LayermoeError(f"no generation given for language(s) {', '.join(unknown)}; add them to generation_of_language")
    too_new = sorted(l for l in texts_by_language if generation_of_language[l] > current_generation)
    if too_new:
        raise LayermoeError(
            f"language(s) {', '.join(too_new)} belong to a generation after the current one ({current_generation}); "
            "train them in a later expansion"
        )
    new = sorted(l for l in texts_by_language if generation_of_language[l] == current_generation)
    old = sorted(l for l in texts_by_language if generation_of_language[l] < current_generation)
    if not new:
        raise LayermoeError(f"no training text for any language of generation {current_generation}; pass the new languages' data")

    def sample(lang: str, cap: int | None) -> list[str]:
        docs = [t for t in texts_by_language[lang] if t and t.strip()]
        if cap is None or cap >= len(docs):
            return docs
        rng = np.random.default_rng([config.seed, _stable_int(lang)])
        keep = np.sort(rng.permutation(len(docs))[:cap])
        return [docs[i] for i in keep]

    chosen = {lang: sample(lang, config.docs_per_new_language) for lang in new}
    empty = [l for l, d in chosen.items() if not d]
    if empty:
        raise LayermoeError(f"language(s) {', '.join(empty)} have no non-empty training documents")
    if config.stage == 2 and old:
        old_cap = config.docs_per_old_language
        if old_cap is None:
            mean_new = sum(len(d) for d in chosen.values()) / len(chosen)
            old_cap = int(round(config.replay_ratio * mean_new))
        if old_cap > 0:
            for lang in old:
                docs = sample(lang, old_cap)
                if docs:
                    chosen[lang] = docs
    return chosen


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# ---------------------------------------------------------------- tokenising (cached)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token_id, tokenizer.bos_token_id, type(tokenizer).__name__])
    return hashlib.sha256((payload + extra).encode()).hexdigest()[:16]


def _texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def token_cache_key(texts: Sequence[str], tokenizer) -> str:
    return f"tok-{tokenizer_fingerprint(tokenizer)}-{_texts_fingerprint(texts)}"


def tokenize_documents(texts: Sequence[str], tokenizer, cache_dir: Path | None, key: str | None = None):
    """A `datasets.Dataset` with one `input_ids` row per document, each ending with EOS.

    The tokenizer's own special tokens are added (BOS for Llama/Gemma, nothing for Qwen),
    then EOS is appended unless already last. Cached under cache_dir by a hash of the
    tokenizer and the texts, so a resumed or repeated run does not tokenise again.
    """
    import datasets

    eos = tokenizer.eos_token_id
    if eos is None:
        raise LayermoeError("the tokenizer has no EOS token; packing needs one to separate documents")

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": [row if row and row[-1] == eos else [*row, eos] for row in ids]}

    key = key or token_cache_key(texts, tokenizer)
    target = Path(cache_dir) / key if cache_dir is not None else None
    if target is not None and (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))
    with _quiet_datasets():
        ds = datasets.Dataset.from_dict({"text": list(texts)})
        ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=["text"], keep_in_memory=True)
    if target is not None:
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_datasets():
            ds.save_to_disk(str(tmp))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp, ignore_errors=True)
        ds = datasets.load_from_disk(str(target))
    return ds


class _quiet_datasets:
    """Silence datasets' per-map progress bars (the training progress is ours)."""

    def __enter__(self):
        import datasets

        self._was = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        if self._was:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- packing


def pack_blocks(
    documents: Iterable[tuple[Sequence[int], int, int]], seq_len: int, pad_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cut a stream of (token ids, generation, language index) documents into blocks.

    Yields (input_ids [L], generation [L], language [L]) int64 arrays; labels stay aligned
    with input_ids because every document's ids and labels are appended together.
    The final partial block is right-padded with pad_id / IGNORE / -1.
    """
    pieces: list[tuple[np.ndarray, int, int]] = []  # pending (ids, generation, language)
    pending = 0

    def take(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nonlocal pending
        ids, gens, langs = [], [], []
        while n > 0:
            tokens, g, l = pieces[0]
            part = tokens[:n]
            ids.append(part)
            gens.append(np.full(len(part), g, dtype=np.int64))
            langs.append(np.full(len(part), l, dtype=np.int64))
            if len(part) == len(tokens):
                pieces.pop(0)
            else:
                pieces[0] = (tokens[n:], g, l)
            n -= len(part)
            pending -= len(part)
        return np.concatenate(ids), np.concatenate(gens), np.concatenate(langs)

    for tokens, generation, language in documents:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            continue
        pieces.append((tokens, int(generation), int(language)))
        pending += len(tokens)
        while pending >= seq_len:
            yield take(seq_len)
    if pending:
        n = pending
        ids, gens, langs = take(n)
        pad = seq_len - n
        yield (
            np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)]),
            np.concatenate([gens, np.full(pad, IGNORE, dtype=np.int64)]),
            np.concatenate([langs, np.full(pad, -1, dtype=np.int64)]),
        )


@dataclass
class PackedData:
    """Packed blocks (memory-mapped Arrow) plus what the labels mean."""

    blocks: "object"  # datasets.Dataset with columns input_ids, generation, language; numpy format
    languages: list[str]  # language index -> code
    generation_of_language: dict[str, int]
    seq_len: int
    pad_id: int
    documents_per_language: dict[str, int]
    tokens_per_language: dict[str, int]

    def __len__(self) -> int:
        return len(self.blocks)

    def batch(self, indices: Sequence[int]):
        """Tensors for the given block indices: input_ids, attention_mask, labels, generation, language, all [B, L]."""
        import torch

        rows = self.blocks[list(map(int, indices))]
        input_ids = torch.as_tensor(np.asarray(rows["input_ids"]), dtype=torch.long)
        generation = torch.as_tensor(np.asarray(rows["generation"]), dtype=torch.long)
        language = torch.as_tensor(np.asarray(rows["language"]), dtype=torch.long)
        attention_mask = (language >= 0).long()
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "generation": generation,
            "language": language,
        }


def build_packed_data(
    documents_by_language: Mapping[str, Sequence[str]],
    generation_of_language: Mapping[str, int],
    tokenizer,
    seq_len: int,
    seed: int,
    cache_dir: Path,
) -> PackedData:
    """Tokenise (cached) every language, shuffle documents across languages, pack, and store
    the blocks as an Arrow file under cache_dir (reused when the same inputs come again)."""
    import datasets
    import pyarrow as pa

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    languages = sorted(documents_by_language)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keys = {lang: token_cache_key(documents_by_language[lang], tokenizer) for lang in languages}
    tokenized = {lang: tokenize_documents(documents_by_language[lang], tokenizer, cache_dir, keys[lang]) for lang in languages}
    key_src = json.dumps([seq_len, seed, pad_id, [(l, generation_of_language[l], keys[l]) for l in languages]])
    path = cache_dir / f"packed-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.arrow"
    counts = {l: len(tokenized[l]) for l in languages}
    lengths = {l: _doc_lengths(tokenized[l]) for l in languages}
    tokens = {l: int(lengths[l].sum()) for l in languages}

    if not path.is_file():
        # One seeded order over all (language, document) pairs mixes languages inside blocks.
        pairs = [(li, di) for li, l in enumerate(languages) for di in range(counts[l])]
        order = np.random.default_rng(seed).permutation(len(pairs))
        # Flat token array per language + offsets: random access to a document is a slice.
        flat = {l: _flat_tokens(tokenized[l]) for l in languages}
        starts = {l: np.concatenate([[0], np.cumsum(lengths[l])]) for l in languages}

        def documents():
            for p in order:
                li, di = pairs[p]
                lang = languages[li]
                yield flat[lang][starts[lang][di] : starts[lang][di + 1]], generation_of_language[lang], li

        schema = pa.schema(
            [("input_ids", pa.list_(pa.int32())), ("generation", pa.list_(pa.int16())), ("language", pa.list_(pa.int16()))]
        )
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            buffer: list[tuple] = []
            for block in pack_blocks(documents(), seq_len, pad_id):
                buffer.append(block)
                if len(buffer) == _WRITE_BATCH:
                    writer.write_batch(_record_batch(buffer, schema))
                    buffer = []
            if buffer:
                writer.write_batch(_record_batch(buffer, schema))
        os.replace(tmp, path)
    blocks = datasets.Dataset.from_file(str(path)).with_format("numpy")
    return PackedData(
        blocks=blocks,
        languages=languages,
        generation_of_language={l: int(generation_of_language[l]) for l in languages},
        seq_len=seq_len,
        pad_id=int(pad_id),
        documents_per_language=counts,
        tokens_per_language=tokens,
    )


def _doc_lengths(tokenized) -> np.ndarray:
    import pyarrow.compute as pc

    column = tokenized.data.column("input_ids").combine_chunks()
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat_tokens(tokenized) -> np.ndarray:
    """All token ids of a tokenised dataset, concatenated, straight from Arrow (no Python lists)."""
    column = tokenized.data.column("input_ids").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)


def _record_batch(blocks: list[tuple], schema):
    import pyarrow as pa

    arrays = [pa.array([b[i].tolist() for b in blocks], type=schema.field(i).type) for i in range(3)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------- deterministic order


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
        perm = np.random.default_rng([seed, epoch]).permutation(num_blocks)
        take = min(count - filled, num_blocks - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out
