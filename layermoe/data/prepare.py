"""Prepare a training stage's data once: read, split, choose, tokenise on every core, store.

`prepare(...)` reads each language's source as a stream, keeps the training side of the
held-out split, chooses documents within the stage's budgets, tokenises them in worker
processes, and appends the ids to one flat file; then it draws the packing order and makes
the directory visible under its cache key. Training only memory-maps the result
(`packing.PackedData`).

Which documents a stage uses (`DataSelection`):
- stage 1: the current generation's (new) languages; stage 2: those plus a replay of every
  earlier generation's (old) languages;
- without a budget, every training-side document of the language, in source order;
- with a budget (a number of documents or of tokens), the source is read as a stream through
  a seeded shuffle buffer of `shuffle_buffer` documents, like `datasets`' streaming shuffle:
  the first `shuffle_buffer` documents fill it, each later one takes the place of a random
  one, which comes out; at the end of the stream the rest come out in a random order. The
  documents that come out are taken until the budget is met, and the reading stops there.
  So a budget chooses among the first (budget + buffer) documents of the source, not
  uniformly from all of it: to sample a whole corpus, shuffle the file once beforehand.
  The choice depends on the seed and the language only (`default_rng([seed, language])`).
- stage 2 caps new languages at `docs_per_new_language` (authors: 100k) and old ones at
  `docs_per_old_language`, else `tokens_per_old_language`, else `replay_ratio` x the mean
  number of new-language documents (authors: 50k).

Cache key: the sources' identity (paths, sizes, modification times; `hf:` name, config,
split, revision), the tokenizer's fingerprint, the languages' generations and the selection
settings. The data is built in `.partial-<key>/` and renamed to `<key>/` only when complete;
a language whose data is complete in the partial directory is kept when a killed prepare runs
again, and the rest is redone, so the result is the same as an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.markup import escape

from layermoe.core.console import err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.numbers import human
from layermoe.core.progress import RateProgress, Throttle
from layermoe.core.workdir import fsync_path
from layermoe.data.packing import FORMAT_VERSION, PreparedData, open_prepared
from layermoe.data.selection import DataSelection
from layermoe.data.sources import (
    CHUNK_BYTES,
    Source,
    no_document_error,
    source_bytes,
    source_chunks,
    source_identity,
    split_rule,
)
from layermoe.data.tokenize import Task, TokenizerPool, id_dtype, tokenizer_fingerprint, usable_cores

_WRITE_TOKENS = 1 << 20  # a budgeted language writes its chosen documents in pieces of about this many tokens


@dataclass(frozen=True)
class Budget:
    documents: int | None = None
    tokens: int | None = None

    @property
    def active(self) -> bool:
        return self.documents is not None or self.tokens is not None

    def reached(self, documents: int, tokens: int) -> bool:
        return (self.documents is not None and documents >= self.documents) or (
            self.tokens is not None and tokens >= self.tokens)

    def describe(self) -> str:
        parts = []
        if self.documents is not None:
            parts.append(f"{self.documents:,} documents")
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} tokens")
        return " / ".join(parts)


def stage_languages(languages, generation_of_language: Mapping[str, int], current_generation: int,
                    stage: int) -> tuple[list[str], list[str]]:
    """(new, old) languages of a stage, in the order they are prepared (old ones in stage 2 only)."""
    unknown = sorted(set(languages) - set(generation_of_language))
    if unknown:
        raise LayermoeError(f"no generation given for language(s) {', '.join(unknown)}; add them to generation_of_language")
    too_new = sorted(lang for lang in languages if generation_of_language[lang] > current_generation)
    if too_new:
        raise LayermoeError(
            f"language(s) {', '.join(too_new)} belong to a generation after the current one ({current_generation}); "
            "train them in a later expansion"
        )
    new = sorted(lang for lang in languages if generation_of_language[lang] == current_generation)
    old = sorted(lang for lang in languages if generation_of_language[lang] < current_generation)
    if not new:
        raise LayermoeError(f"no training text for any language of generation {current_generation}; pass the new languages' data")
    return new, (old if stage == 2 else [])


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def language_rng(seed: int, language: str) -> np.random.Generator:
    return np.random.default_rng([seed, _stable_int(language)])


class ShuffleBuffer:
    """A seeded shuffle buffer over a stream of documents (see the module docstring)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.items = size, rng, []

    def push(self, item):
        """Add `item`; return the document that comes out, or None while the buffer fills."""
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        slot = int(self.rng.integers(self.size))
        out, self.items[slot] = self.items[slot], item
        return out

    def drain(self) -> Iterator:
        for slot in self.rng.permutation(len(self.items)):
            yield self.items[slot]
        self.items = []


# --------------------------------------------------------------------------- the cache key


def prepared_key(sources: Mapping[str, Source], generation_of_language: Mapping[str, int], current_generation: int,
                 selection: DataSelection, tokenizer) -> str:
    new, old = stage_languages(sources, generation_of_language, current_generation, selection.stage)
    payload = {
        "format": FORMAT_VERSION,
        "current_generation": current_generation,
        "selection": selection.key_fields(),
        "languages": [[lang, int(generation_of_language[lang]), source_identity(sources[lang])] for lang in new + old],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": id_dtype(tokenizer).name,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def is_prepared(path: Path) -> bool:
    """A prepared directory is complete as soon as it exists (it appears by an atomic rename)."""
    return (Path(path) / "meta.json").is_file()


# --------------------------------------------------------------------------- writing


class _Partial:
    """The directory a prepare writes into: appended ids and lengths, plus the languages done so far."""

    def __init__(self, path: Path, key: str, dtype: np.dtype):
        self.path, self.key, self.dtype = path, key, dtype
        self.done: list[dict] = []
        state = path / "progress.json"
        if state.is_file():
            try:
                saved = json.loads(state.read_text(encoding="utf-8"))
                self.done = saved["done"] if saved.get("key") == key else []
            except (OSError, ValueError, KeyError):
                self.done = []
        path.mkdir(parents=True, exist_ok=True)
        tokens, documents = sum(s["tokens"] for s in self.done), sum(s["documents"] for s in self.done)
        for name, size in (("tokens.bin", tokens * dtype.itemsize), ("lengths.bin", documents * 4)):
            file = path / name
            if not file.exists() or file.stat().st_size < size:  # less than was committed: start over
                self.done, tokens, documents = [], 0, 0
                break
        for name, size in (("tokens.bin", tokens * dtype.itemsize), ("lengths.bin", documents * 4)):
            with open(path / name, "ab") as f:  # drop what a killed run wrote after its last commit
                f.truncate(size)
        self.tokens = open(path / "tokens.bin", "ab")
        self.lengths = open(path / "lengths.bin", "ab")

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.lengths.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())

    def commit(self, stats: dict) -> None:
        """A language is complete: make its data durable, then record it."""
        for f in (self.tokens, self.lengths):
            f.flush()
            os.fsync(f.fileno())
        self.done.append(stats)
        tmp = self.path / "progress.json.tmp"
        tmp.write_text(json.dumps({"key": self.key, "done": self.done}), encoding="utf-8")
        os.replace(tmp, self.path / "progress.json")

    def close(self) -> None:
        self.tokens.close()
        self.lengths.close()


class _Lock:
    """flock on `<root>/.lock`: one process prepares in a cache directory at a time (released if it dies)."""

    def __init__(self, root: Path):
        self.path = root / ".lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


# --------------------------------------------------------------------------- one language


def _budget(lang: str, generation: int, new: list[str], selection: DataSelection, done: list[dict]) -> Budget:
    if lang in new:
        return Budget(selection.docs_per_new_language, selection.tokens_per_language)
    by_docs = (selection.replay_docs_by_generation or {}).get(generation)
    by_tokens = (selection.replay_tokens_by_generation or {}).get(generation)
    if by_docs is not None or by_tokens is not None:  # this earlier generation's own replay budget
        return Budget(by_docs, by_tokens)
    documents = selection.docs_per_old_language
    if documents is None and selection.tokens_per_old_language is None:
        kept = [s["documents"] for s in done if s["language"] in new]
        documents = int(round(selection.replay_ratio * sum(kept) / len(kept)))
    return Budget(documents, selection.tokens_per_old_language)


def _prepare_language(source: Source, generation: int, budget: Budget, selection: DataSelection, partial: _Partial,
                      tokenizer, num_proc: int, progress: RateProgress, chunk_bytes: int, on_progress) -> dict:
    lang = source.language
    stats = {"language": lang, "generation": generation, "documents": 0, "tokens": 0, "documents_read": 0,
             "bytes_read": 0, "source_bytes": source_bytes(source), "budget": budget.describe() or None,
             "read_to_end": False, "budget_met": False}
    if budget.documents == 0:
        return stats
    rule = split_rule(source, "all" if source.texts is not None else "train", selection.heldout_fraction)
    unit, total = (("tokens", budget.tokens) if budget.tokens else ("documents", budget.documents) if budget.documents
                   else ("bytes", stats["source_bytes"]))
    task = progress.add(f"prepare {lang} ({num_proc} process{'es' if num_proc > 1 else ''})", total=total, unit=unit)

    def submitted(t: Task) -> None:
        stats["bytes_read"] += t.chunk.nbytes

    def kept_batches(pool: TokenizerPool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The training-side documents of the source, a chunk at a time, in source order."""
        in_file = 0
        tasks = (Task(chunk, lang, source.text_field, rule) for chunk in source_chunks(source, chunk_bytes))
        for result in pool.map(tasks, on_submit=submitted):
            stats["documents_read"] += result.documents
            in_file += result.documents
            if result.last:
                if not in_file:
                    raise no_document_error(lang, result.where)
                in_file = 0
            if not budget.active:
                progress.update(task, completed=stats["bytes_read"], documents=len(result.lengths),
                                tokens=int(result.lengths.sum()))
            if on_progress is not None:
                on_progress(lang, stats)
            yield result.ids, result.lengths
        stats["read_to_end"] = True

    with TokenizerPool(tokenizer, partial.dtype, num_proc) as pool:
        if not budget.active:  # every document, in source order: whole chunks go straight to disk
            for ids, lengths in kept_batches(pool):
                partial.append(ids, lengths)
                stats["documents"] += len(lengths)
                stats["tokens"] += int(lengths.sum())
        else:
            buffer = ShuffleBuffer(selection.shuffle_buffer, language_rng(selection.seed, lang))
            pending: list[np.ndarray] = []
            pending_tokens = 0

            def chosen() -> Iterator[np.ndarray]:
                for ids, lengths in kept_batches(pool):
                    for document in np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else ():
                        out = buffer.push(document.copy())  # a copy: a view would keep its whole chunk alive
                        if out is not None:
                            yield out
                yield from buffer.drain()

            for document in chosen():
                pending.append(document)
                pending_tokens += len(document)
                stats["documents"] += 1
                stats["tokens"] += len(document)
                progress.update(task, completed=stats[unit], documents=1, tokens=len(document))
                if pending_tokens >= _WRITE_TOKENS:
                    partial.append(np.concatenate(pending), np.array([len(d) for d in pending]))
                    pending, pending_tokens = [], 0
                if budget.reached(stats["documents"], stats["tokens"]):
                    stats["budget_met"] = True
                    break
            if pending:
                partial.append(np.concatenate(pending), np.array([len(d) for d in pending]))
    if stats["documents"] == 0:
        raise LayermoeError(
            f"data for {lang!r}: no training documents: all {stats['documents_read']:,} of its documents are held out "
            f"for evaluation (the {selection.heldout_fraction:.0%} split by text hash): give it more documents"
        )
    progress.finish(task, note=_language_note(stats, budget))
    return stats


def _language_note(stats: dict, budget: Budget) -> str:
    if not budget.active:
        return "done"
    if stats["budget_met"]:
        return f"budget met ({budget.describe()})"
    return (f"the whole source holds fewer training documents than the budget ({budget.describe()}): "
            f"all {stats['documents']:,} are used")


# --------------------------------------------------------------------------- the stage


def prepare(sources: Mapping[str, Source], generation_of_language: Mapping[str, int], current_generation: int,
            selection: DataSelection, tokenizer, root: str | Path, *, num_proc: int | None = None, console=None,
            show_progress: bool = True, chunk_bytes: int = CHUNK_BYTES, on_progress=None) -> PreparedData:
    """Prepare (or find) a stage's data under `root/<key>/` and return it memory-mapped.

    sources: one `Source` per language (more languages than the stage needs are ignored).
    num_proc: tokenising processes (default: the usable cores).
    on_progress(language, stats): called after each chunk (tests use it to kill the process).
    """

    console = console or err_console
    root = Path(root)
    new, old = stage_languages(sources, generation_of_language, current_generation, selection.stage)
    key = prepared_key(sources, generation_of_language, current_generation, selection, tokenizer)
    final = root / key
    if is_prepared(final):
        return open_prepared(final)
    root.mkdir(parents=True, exist_ok=True)
    num_proc = usable_cores() if num_proc is None else max(1, int(num_proc))
    dtype = id_dtype(tokenizer)
    with _Lock(root):
        if is_prepared(final):  # another process finished it while we waited for the lock
            return open_prepared(final)
        partial = _Partial(root / f".partial-{key}", key, dtype)
        notes = []
        try:
            done = {s["language"] for s in partial.done}  # by a run that was killed: kept
            with RateProgress(console, enabled=show_progress) as progress:
                for lang in new + old:
                    if lang in done:
                        continue
                    budget = _budget(lang, int(generation_of_language[lang]), new, selection, partial.done)
                    stats = _prepare_language(sources[lang], int(generation_of_language[lang]), budget, selection,
                                              partial, tokenizer, num_proc, progress, chunk_bytes, on_progress)
                    partial.commit(stats)
        finally:
            partial.close()
        for stats in partial.done:
            if stats["budget"] and stats["read_to_end"] and not stats["budget_met"] and stats["documents"]:
                notes.append(f"{stats['language']} has {stats['tokens']:,} training tokens in {stats['documents']:,} "
                             f"documents, fewer than its budget ({stats['budget']}): all of them are used")
        for note in notes:
            console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True, highlight=False, emoji=False)
        _finish(partial, final, selection, generation_of_language, current_generation, tokenizer, sources, notes)
    return open_prepared(final)


def _finish(partial: _Partial, final: Path, selection: DataSelection, generation_of_language, current_generation,
            tokenizer, sources, notes) -> None:
    """Write lengths, packing order and meta into the partial directory, then rename it into place."""
    path = partial.path
    stats = [s for s in partial.done if s["documents"] > 0]
    documents = sum(s["documents"] for s in stats)
    lengths = np.fromfile(path / "lengths.bin", dtype=np.int32) if documents else np.empty(0, np.int32)
    np.save(path / "lengths.npy", lengths)
    order = np.random.default_rng(selection.seed).permutation(documents)
    np.save(path / "order.npy", order.astype(np.int32 if documents < 2**31 else np.int64))
    (path / "lengths.bin").unlink()
    (path / "progress.json").unlink()
    meta = {
        "format": FORMAT_VERSION,
        "key": partial.key,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stage": selection.stage,
        "current_generation": current_generation,
        "languages": [s["language"] for s in stats],
        "generation_of_language": {s["language"]: s["generation"] for s in stats},
        "dtype": partial.dtype.name,
        "eos_id": int(tokenizer.eos_token_id),
        "num_documents": documents,
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "selection": selection.model_dump(mode="json"),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": [source_identity(sources[s["language"]]) for s in stats],
        "stats": stats,
        "notes": notes,
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for name in ("tokens.bin", "lengths.npy", "order.npy", "meta.json"):
        fsync_path(path / name)
    fsync_path(path)
    if final.exists():  # a damaged or foreign directory under our key: replace it
        shutil.rmtree(final)
    os.rename(path, final)
    fsync_path(final.parent)


# --------------------------------------------------------------------------- several processes


def local_rank() -> int:
    """This process's index on its machine under torchrun / accelerate launch (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def wait_for_prepared(path: str | Path, console=None, poll_s: float = 1.0) -> PreparedData:
    """Wait, by polling the file system (no collective call, so no NCCL timeout), until another
    process has made `path` visible, then map it."""

    path, throttle = Path(path), Throttle()
    started = time.monotonic()
    while not is_prepared(path):
        if throttle.due():
            (console or err_console).print(f"rank {os.environ.get('RANK', '?')}: waiting for the first process to "
                                           f"prepare {path} ({human(time.monotonic() - started)} s)", highlight=False)
        time.sleep(poll_s)
    return open_prepared(path)


def prepare_or_wait(sources: Mapping[str, Source], generation_of_language: Mapping[str, int], current_generation: int,
                    selection: DataSelection, tokenizer, root: str | Path, **kwargs) -> PreparedData:
    """`prepare` on each machine's first process; the others wait for its result on disk."""
    if local_rank() == 0:
        return prepare(sources, generation_of_language, current_generation, selection, tokenizer, root, **kwargs)
    key = prepared_key(sources, generation_of_language, current_generation, selection, tokenizer)
    return wait_for_prepared(Path(root) / key, kwargs.get("console"))
