"""The work dir: manifest I/O (atomic), the single-process lock, step bookkeeping, rollback.

Layout:
    <workdir>/manifest.json        the lineage (see manifest.py)
    <workdir>/.layermoe.lock       held (flock) by the one process using the work dir
    <workdir>/g<N>/                outputs of generation N (plots, checkpoints, logs)
    <workdir>/cache/               tokenised data, converted GGUF models
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import Manifest, StepRecord, StepStatus, parse_manifest, utc_now

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".layermoe.lock"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class Workdir:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def generation_dir(self, index: int) -> Path:
        return self.root / f"g{index}"

    def load(self) -> Manifest:
        if not self.has_manifest():
            raise LayermoeError(
                f"no layermoe manifest in {self.root}: start with `layermoe profile --model M --old L --new L` "
                "(or pass --workdir)"
            )
        return parse_manifest(self.manifest_path.read_text(encoding="utf-8"), str(self.manifest_path))

    def save(self, manifest: Manifest) -> None:
        manifest.updated_at = utc_now()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest_path, manifest.to_json() + "\n")

    def rel(self, path: str | Path) -> str:
        """A path as stored in the manifest: relative to the work dir (POSIX separators)."""
        return Path(os.path.relpath(Path(path).absolute(), self.root)).as_posix()

    def resolve(self, stored: str) -> Path:
        return (self.root / stored).resolve()

    # --- the lock ---------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the work dir by this process (flock: released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LayermoeError(f"work dir {self.root} is in use by {_describe_holder(path)}: wait for it to finish or stop it")
            # The holder before us may have unlinked the file after we opened it: retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now().isoformat()}).encode())
        os.fsync(fd)
        try:
            yield
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)


def _describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


# --- rollback of bad input ------------------------------------------------------------


def _snapshot(root: Path) -> set[str]:
    found = set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.join(directory, name))
    return found


@contextmanager
def unchanged_on_bad_input(workdir: Workdir) -> Iterator[None]:
    """If a LayermoeError escapes, put the work dir back as it was: same manifest, no new files.

    A bug (any other exception) is not rolled back: its partial outputs are evidence, and
    the step that failed is marked `failed` in the manifest by `run_step`.
    """
    existed = workdir.root.exists()
    before = _snapshot(workdir.root) if existed else set()
    manifest_bytes = workdir.manifest_path.read_bytes() if workdir.has_manifest() else None
    try:
        yield
    except LayermoeError:
        if not existed:
            shutil.rmtree(workdir.root, ignore_errors=True)
        else:
            for path in sorted(_snapshot(workdir.root) - before, key=len, reverse=True):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.lexists(path):
                    os.unlink(path)
            if manifest_bytes is not None:
                atomic_write_bytes(workdir.manifest_path, manifest_bytes)
        raise


@contextmanager
def session(workdir: Workdir) -> Iterator[None]:
    """What every command that writes runs inside: rollback on bad input, then the lock."""
    with unchanged_on_bad_input(workdir), workdir.lock():
        yield


# --- step bookkeeping -------------------------------------------------------------------


class StepAlreadyDone(Exception):
    """Raised by `run_step` when the step is done and --force was not given (a no-op, exit 0)."""


@contextmanager
def run_step(workdir: Workdir, manifest: Manifest, record: StepRecord, label: str, config: dict, force: bool = False,
             on_stale=None) -> Iterator[StepRecord]:
    """Mark `record` running, then done or failed; persist each transition atomically.

    We hold the work dir's lock, so a record already `running` was left by a dead process:
    `on_stale(record)` is told (the step restarts, or resumes if it keeps checkpoints).
    """
    if record.status == StepStatus.done and not force:
        raise StepAlreadyDone(f"{label} is done already (use --force to redo it)")
    if record.status == StepStatus.running and on_stale is not None:
        on_stale(record)
    record.status = StepStatus.running
    record.config = config
    record.started_at, record.finished_at = utc_now(), None
    record.pid, record.host, record.error = os.getpid(), socket.gethostname(), None
    workdir.save(manifest)
    try:
        yield record
    except LayermoeError:
        raise  # bad input: `unchanged_on_bad_input` restores the manifest as it was
    except BaseException as e:
        record.status = StepStatus.failed
        record.error = f"{type(e).__name__}: {e}".splitlines()[0][:500] if str(e) else type(e).__name__
        record.finished_at = utc_now()
        workdir.save(manifest)
        raise
    record.status = StepStatus.done
    record.finished_at = utc_now()
    workdir.save(manifest)


def require_done(record: StepRecord, what: str, command: str) -> None:
    if record.status != StepStatus.done:
        raise LayermoeError(f"{what} is not done yet ({record.status.value}): run `{command}` first")
