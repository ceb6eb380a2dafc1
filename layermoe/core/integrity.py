"""Weights checked against the disk.

When a step writes a model (expand, train) or a resume checkpoint, it records the sha256 of
every file it wrote, and for each safetensors file a short digest of every tensor's bytes,
both from one streaming pass. Whenever a model or a resume checkpoint is read again, its
files' sha256 are compared with the record first (hashed once per file and process, see
`file_sha256`); a mismatch is refused with one line naming the file and, from the
per-tensor digests, the tensor that changed. `set_verification(False)` (the CLI's
`--no-verify`) skips the comparison with a warning.

Plain files and hashes only: no manifest, no CLI, no torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layermoe.core.console import err_console
from layermoe.core.errors import LayermoeError

CHUNK = 8 << 20
_READ_CHUNK = 1 << 20  # read size of file_sha256
# A tensor digest only has to tell which tensor changed once the file's sha256 said that one
# did: 64 bits are plenty, and keep the record small (hundreds of tensors per checkpoint).
TENSOR_DIGEST_CHARS = 16
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

_verify = True
_warned = False


def set_verification(enabled: bool) -> None:
    """Turn the checks off (`--no-verify`) or on for this process."""
    global _verify, _warned
    _verify, _warned = bool(enabled), False


def verification_enabled() -> bool:
    """True if checks run; when off, says so once per process (a warning on stderr)."""
    global _warned
    if not _verify and not _warned:
        _warned = True

        err_console.print("[yellow]warning:[/] --no-verify: models and checkpoints are read without checking them "
                          "against their recorded sha256", soft_wrap=True, highlight=False)
    return _verify


# ---------------------------------------------------------------- files


_sha_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks; memoised on (path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
        _sha_memo[key] = digest.hexdigest()
    return _sha_memo[key]


def remember_sha256(path: str | Path, digest: str) -> None:
    """Record a digest computed elsewhere (e.g. while writing the file), so `file_sha256` needs no second pass."""
    path = Path(path)
    stat = path.stat()
    _sha_memo[(str(path.resolve()), stat.st_size, stat.st_mtime_ns)] = digest


def check_readable_weights(directory: str | Path, fix: str = "restore it, or run the step that wrote it again with --force") -> None:
    """One line (not a loader's traceback) if a safetensors file of `directory` is truncated or its header corrupt."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise LayermoeError(f"{path} {problem}: {fix}")


# ---------------------------------------------------------------- safetensors


class _Unreadable(Exception):
    """A safetensors file whose header cannot be parsed (message: why)."""


def _read_header(f, size: int) -> tuple[bytes, dict]:
    """(the 8 length bytes + the JSON header bytes, the parsed header) of an open safetensors file."""
    head = f.read(8)
    if len(head) < 8:
        raise _Unreadable(f"it has {size} bytes, not even a header")
    (length,) = struct.unpack("<Q", head)
    if length > min(_MAX_HEADER, size - 8):
        raise _Unreadable(f"its header claims {length:,} bytes but the file has {size:,}")
    raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError:
        raise _Unreadable("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _Unreadable("its header is not a JSON object")
    return head + raw, header


def _tensor_ranges(header: dict) -> list[tuple[int, int, str]]:
    """(begin, end, name) of every tensor, relative to the data section, by position."""
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _Unreadable(f"its header entry for {name} has no data offsets") from None
        ranges.append((begin, end, name))
    return sorted(ranges)


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a complete safetensors file (header only, no hashing), or None.

    Catches a truncated file before a loader fails on it with a traceback.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head, header = _read_header(f, size)
    except _Unreadable as e:
        return f"is truncated or corrupt: {e}"
    end = max((e for _, e, _ in _tensor_ranges(header)), default=0)
    expected = len(head) + end
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    return None


def safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors header (nothing else is read); LayermoeError if unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            _, header = _read_header(f, path.stat().st_size)
    except _Unreadable as e:
        raise LayermoeError(f"{path} is truncated or corrupt: {e}") from None
    return {name: list(info.get("shape") or []) for name, info in header.items()
            if name != "__metadata__" and isinstance(info, dict)}


def safetensors_checksums(path: str | Path) -> tuple[str, dict[str, str]]:
    """(sha256 of the file, {tensor name: digest of its bytes}) from one streaming pass.

    The file's digest runs in a second thread (hashlib releases the GIL), so recording the
    per-tensor digests costs no extra wall time on a machine with two cores.
    """
    path = Path(path)
    size = path.stat().st_size
    file_digest = hashlib.sha256()
    with open(path, "rb") as f, ThreadPoolExecutor(max_workers=1) as pool:
        head, header = _read_header(f, size)
        file_digest.update(head)
        ranges = _tensor_ranges(header)
        digests = {name: hashlib.sha256() for _, _, name in ranges}
        offset, i = 0, 0  # offset in the data section; ranges[i] is the first tensor not finished
        while chunk := f.read(CHUNK):
            pending = pool.submit(file_digest.update, chunk)
            view = memoryview(chunk)
            chunk_end = offset + len(chunk)
            j = i
            while j < len(ranges) and ranges[j][0] < chunk_end:
                begin, end, name = ranges[j]
                lo, hi = max(begin, offset), min(end, chunk_end)
                if lo < hi:
                    digests[name].update(view[lo - offset : hi - offset])
                if end <= chunk_end and j == i:
                    i += 1
                j += 1
            pending.result()
            offset = chunk_end
    digest = file_digest.hexdigest()
    remember_sha256(path, digest)
    return digest, {name: d.hexdigest()[:TENSOR_DIGEST_CHARS] for name, d in digests.items()}


# ---------------------------------------------------------------- recording


def file_checksums(directory: str | Path, exclude: tuple[str, ...] = (), recursive: bool = False) -> dict[str, dict]:
    """{relative path: {"sha256", "size", "tensors"}} for the files of a checkpoint folder.

    `tensors` (safetensors files only) maps each tensor to a digest of its bytes.
    """
    directory = Path(directory)
    files = directory.rglob("*") if recursive else directory.iterdir()
    found = {}
    for path in sorted(p for p in files if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name in exclude:
            continue
        entry = {"size": path.stat().st_size, "tensors": {}}
        if path.suffix == ".safetensors":
            entry["sha256"], entry["tensors"] = safetensors_checksums(path)
        else:
            entry["sha256"] = file_sha256(path)
        found[name] = entry
    return found


# ---------------------------------------------------------------- verifying


def _changed_tensors(path: Path, recorded: dict[str, str]) -> str:
    """What differs inside a safetensors file whose sha256 no longer matches: a phrase."""
    problem = safetensors_problem(path)
    if problem is not None:
        return problem.removeprefix("is ")
    try:
        _, now = safetensors_checksums(path)
    except _Unreadable as e:
        return f"corrupt: {e}"
    changed = [name for name, digest in recorded.items() if now.get(name) != digest]
    added = sorted(set(now) - set(recorded))
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        return f"tensor {changed[0]} changed{more}"
    if added:
        return f"tensor {added[0]} was added"
    return "its header changed"


def check_files(directory: str | Path, recorded: dict[str, dict], *, shown: str, written_by: str, fix: str) -> None:
    """Raise a one-line LayermoeError unless every recorded file under `directory` matches its record.

    shown: how to name `directory` in the message (e.g. its path relative to the work dir);
    written_by: what wrote it ("stage 1 of G2"); fix: what the user can do ("run `...`").
    """
    if not recorded or not verification_enabled():
        return
    directory = Path(directory)
    for name, entry in recorded.items():
        path = directory / name
        where = f"{shown.rstrip('/')}/{name}"
        if not path.is_file():
            raise LayermoeError(f"{where} is missing (written by {written_by}): {fix}")
        size, want = path.stat().st_size, entry.get("sha256")
        if size == entry.get("size", size) and file_sha256(path) == want:
            continue
        if path.suffix == ".safetensors":
            what = _changed_tensors(path, entry.get("tensors") or {})
        else:
            what = "its content changed" if size == entry.get("size", size) else f"its size changed ({size:,} bytes, not {entry['size']:,})"
        raise LayermoeError(f"{where} does not match what {written_by} wrote ({what}): {fix}, "
                            "or pass --no-verify to read it as it is")


def check_sha256(files: dict[str, Path], recorded: dict[str, str], tensors: dict[str, dict[str, str]], *, shown: str,
                 fix: str) -> None:
    """Like `check_files` for a base model: `files` name -> path now, `recorded` name -> sha256 (its weights; in
    work dirs made by newer versions, its config.json and tokenizer files too)."""
    if not recorded or not verification_enabled():
        return
    for name, want in recorded.items():
        path = files.get(name)
        if path is None or not path.is_file():
            raise LayermoeError(f"{shown} {name} is missing: {fix}")
        if file_sha256(path) == want:
            continue
        what = _changed_tensors(path, tensors.get(name) or {}) if path.suffix == ".safetensors" else "its content changed"
        raise LayermoeError(f"{shown} {path} does not match the sha256 recorded at profile ({what}): {fix}, "
                            "or pass --no-verify to use it as it is")
