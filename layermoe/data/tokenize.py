"""Tokenising chunks of a source on every core: parse, split, encode, in worker processes.

Each task is one `Chunk` (a few MB of raw lines or a list of texts). A worker parses it into
documents, keeps one side of the held-out split, and encodes the documents with the model's
tokenizer in one batched call; it sends back the token ids as one flat array (uint16 or
uint32) and the documents' lengths. The main process only reads bytes and appends arrays.

Why a hand-written pool rather than `datasets.Dataset.map(num_proc=N)`: `map` needs the whole
text as an Arrow table first (a full copy of the corpus, read to its end even when a budget
needs only a prefix), and `IterableDataset.map` runs on one core. Here at most
`2 x num_proc` chunks are in flight, results come back in source order, and the reading stops
as soon as a budget is met.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np

from layermoe.core.errors import LayermoeError
from layermoe.data.sources import Chunk, parse_chunk
from layermoe.data.split import SplitRule


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids: the tokenizer's full definition and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token_id, tokenizer.bos_token_id, type(tokenizer).__name__])
    return hashlib.sha256((payload + extra).encode()).hexdigest()[:16]


def id_dtype(tokenizer) -> np.dtype:
    """uint16 when every id fits (a vocabulary of at most 65,536 entries), else uint32."""
    return np.dtype(np.uint16) if len(tokenizer) <= 1 << 16 else np.dtype(np.uint32)


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LayermoeError("the tokenizer has no EOS token; packing needs one to separate documents")
    return int(tokenizer.eos_token_id)


ENCODE_BATCH = 128  # documents per tokenizer call: bounds the Python lists of ids a call returns


def encode(tokenizer, texts: list[str], eos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths): each text as the tokenizer encodes it with its special tokens (BOS
    for Llama/Gemma, nothing for Qwen), then EOS unless it already ends with it."""
    flats, lengths = [np.empty(0, dtype)], [np.empty(0, np.int32)]
    tail = (eos,)
    for start in range(0, len(texts), ENCODE_BATCH):
        rows = tokenizer(texts[start:start + ENCODE_BATCH], add_special_tokens=True, return_attention_mask=False)["input_ids"]
        ends_with_eos = [bool(r) and r[-1] == eos for r in rows]
        sizes = np.fromiter((len(r) + (not e) for r, e in zip(rows, ends_with_eos)), np.int32, len(rows))
        pieces = chain.from_iterable((r,) if e else (r, tail) for r, e in zip(rows, ends_with_eos))
        flats.append(np.fromiter(chain.from_iterable(pieces), dtype, int(sizes.sum())))
        lengths.append(sizes)
    return np.concatenate(flats), np.concatenate(lengths)


@dataclass
class ChunkResult:
    where: str
    last: bool  # the chunk was its file's last
    nbytes: int
    documents: int  # non-blank documents in the chunk (both sides of the split)
    ids: np.ndarray  # flat token ids of the kept documents
    lengths: np.ndarray  # int32, one per kept document


@dataclass(frozen=True)
class Task:
    chunk: Chunk
    language: str
    text_field: str
    rule: SplitRule


@dataclass
class _State:
    tokenizer: object
    eos: int
    dtype: np.dtype


def run_task(state: _State, task: Task) -> ChunkResult:
    documents = parse_chunk(task.language, task.chunk, task.text_field)
    kept = task.rule.filter(documents)
    ids, lengths = encode(state.tokenizer, kept, state.eos, state.dtype)
    chunk = task.chunk
    return ChunkResult(chunk.where, chunk.last, chunk.nbytes, len(documents), ids, lengths)


_worker: _State | None = None


def _init_worker(state: _State, parent: int) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    try:  # die with the main process, even on SIGKILL (Linux); elsewhere the pool's pipes end it
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)
    _worker = state


def _run_in_worker(task: Task) -> ChunkResult:
    return run_task(_worker, task)


class TokenizerPool:
    """Ordered, bounded parallel map of `run_task` over tasks; `num_proc == 1` runs in this process."""

    def __init__(self, tokenizer, dtype, num_proc: int):
        self.state = _State(tokenizer, eos_id(tokenizer), np.dtype(dtype))
        self.num_proc = max(1, int(num_proc))
        self.pool = None
        if self.num_proc > 1:
            import multiprocessing as mp

            # fork: the workers inherit the tokenizer instead of loading it again (spawn elsewhere).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(self.num_proc, _init_worker, (self.state, os.getpid()))

    def __enter__(self) -> "TokenizerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def map(self, tasks: Iterable[Task], on_submit=None) -> Iterator[ChunkResult]:
        """Results in task order. Tasks are taken from `tasks` only as results are consumed
        (at most 2 x num_proc ahead), so stopping the iteration stops the reading."""
        if self.pool is None:
            for task in tasks:
                if on_submit is not None:
                    on_submit(task)
                yield run_task(self.state, task)
            return
        pending: deque = deque()
        for task in tasks:
            if on_submit is not None:
                on_submit(task)
            pending.append(self.pool.apply_async(_run_in_worker, (task,)))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
