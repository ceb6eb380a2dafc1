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
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from layermoe.core.console import err_console
from layermoe.core.errors import LayermoeError, StoppedWithWorkKept
from layermoe.core.manifest import Manifest, StepRecord, StepStatus, describe_steps, parse_manifest, utc_now
from layermoe.core.numbers import human_bytes

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".layermoe.lock"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where Linux shows it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or the new one, never a mix.

    The file keeps the mode it had; a new file gets what `open()` would give (0666 minus the
    umask), not mkstemp's private 0600.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# Below this much free space, a failed write is taken for a full disk: torch.save and safetensors
# report one as a RuntimeError ("unexpected pos ...") or an IOError without errno.
NEARLY_FULL_BYTES = 64 * 2**20


def disk_full_message(root: Path, error: BaseException) -> str | None:
    """One line for an error that a full disk under `root` caused, or None for any other error."""

    probe = next((p for p in (Path(root), *Path(root).parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    no_space = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not no_space and free >= NEARLY_FULL_BYTES:
        return None
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"the disk holding {root} is full ({human_bytes(free)} free; {reason}): free some space, then run the "
            "command again (training resumes from its last complete checkpoint)")


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
        manifest = parse_manifest(self._manifest_text(), str(self.manifest_path))
        if manifest.base_model is None:
            raise LayermoeError(f"{self.manifest_path} records no base model: restore it from a backup or start a new "
                                "work dir with `layermoe profile --model M ...`")
        return manifest

    def _manifest_text(self) -> str:
        """manifest.json as text; one line naming the file if it cannot be read or is not UTF-8 text."""
        restore = "restore it from a backup, or start a new work dir with `layermoe profile --model M ...`"
        try:
            data = self.manifest_path.read_bytes()
        except OSError as e:
            raise LayermoeError(f"cannot read {self.manifest_path} ({e.strerror or e}): make it readable, or {restore}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LayermoeError(f"{self.manifest_path} is not a text file (byte {e.start:,} is not UTF-8), so not a layermoe "
                                f"manifest: {restore}") from None

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
        """Exclusive use of the work dir by this process (flock: released if the process dies).

        A process refused the lock has changed nothing (at most it created the work dir's
        folder, which the holder then uses). The lock file is unlinked on release; see
        `_acquire` for why a process that opened the old file can never run beside a new holder.
        """
        fd = self._acquire()
        try:
            yield
        finally:
            try:
                os.unlink(self.root / LOCK_NAME)
            except FileNotFoundError:
                pass
            os.close(fd)  # unlink before close: whoever flocks this inode next sees it unlinked

    def _acquire(self) -> int:
        path = self.root / LOCK_NAME
        while True:
            self._make_root()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # a holder that rolled back a fresh work dir removed the folder just now
            except OSError as e:
                raise LayermoeError(f"cannot write in work dir {self.root} ({e.strerror}): "
                                    "make it writable or pass another --workdir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LayermoeError(f"work dir {self.root} is in use by {_describe_holder(path)}: wait for it to finish or stop it")
            # We may have opened the file of a holder that unlinked it (and released it) before our
            # flock: the lock is then that of a file nobody else will ever open. Keep it only if it
            # is still the file at `path`; else retry on the file there now (a new holder's or none).
            try:
                here, there = os.fstat(fd), os.stat(path)
                same = (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if not os.access(self.root, os.W_OK | os.X_OK):
            os.close(fd)
            raise LayermoeError(f"cannot write in work dir {self.root} (permission denied): make it writable or pass another --workdir")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now().isoformat()}).encode())
        os.fsync(fd)
        return fd

    def _make_root(self) -> None:
        if self.root.is_symlink() and not self.root.exists():
            raise LayermoeError(f"work dir {self.root} is a symlink to {os.readlink(self.root)}, which does not exist: "
                                "create that folder, or pass another --workdir")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise LayermoeError(f"work dir {self.root} is a file, not a directory: pass another --workdir") from None
        except OSError as e:
            raise LayermoeError(f"cannot create work dir {self.root} ({e.strerror}): pass another --workdir") from None


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
def unchanged_on_bad_input(workdir: Workdir, fresh: bool | None = None) -> Iterator[None]:
    """If a LayermoeError escapes, put the work dir back as it was: same manifest, no new files.

    Run it while holding the lock (`session` does): it snapshots the work dir, so it must see
    no other process's changes. `fresh`: the work dir did not exist before this command (then
    everything but the lock file is removed; `session` removes the folder after the release).
    A bug (any other exception) is not rolled back: its partial outputs are evidence, and
    the step that failed is marked `failed` in the manifest by `run_step`.
    """
    fresh = not workdir.root.exists() if fresh is None else fresh
    before = set() if fresh else _snapshot(workdir.root)
    manifest_bytes = workdir.manifest_path.read_bytes() if workdir.has_manifest() else None
    try:
        yield
    except StoppedWithWorkKept:
        raise
    except LayermoeError:
        keep = before | {str(workdir.root / LOCK_NAME)}
        for path in sorted(_snapshot(workdir.root) - keep, key=len, reverse=True):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        if manifest_bytes is not None and (not workdir.has_manifest() or workdir.manifest_path.read_bytes() != manifest_bytes):
            atomic_write_bytes(workdir.manifest_path, manifest_bytes)
        raise


def _remove_if_empty(root: Path) -> None:
    """Remove `root` if nothing but empty folders is in it (another process may add a file: then keep it)."""
    for directory, _, filenames in os.walk(root):
        if filenames:
            return
    for directory, _, _ in sorted(os.walk(root, topdown=False), key=lambda entry: len(entry[0]), reverse=True):
        try:
            os.rmdir(directory)
        except OSError:
            return


def _test_gate() -> None:
    """Tests only: with LAYERMOE_TEST_LOCK_GATE=PATH, announce PATH.waiting and wait for PATH.go.

    It sits right before the lock is tried, so a test can let another process take the lock
    in that gap deterministically instead of by luck.
    """
    gate = os.environ.get("LAYERMOE_TEST_LOCK_GATE")
    if not gate:
        return
    import time

    Path(gate + ".waiting").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(gate + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)


@contextmanager
def session(workdir: Workdir) -> Iterator[None]:
    """What every command that writes runs inside: the lock first, then rollback on bad input.

    Order matters: a process refused the lock has looked at nothing, so it restores nothing
    (restoring a snapshot taken before another process took the lock would delete that
    process's files, its lock file included, and rewrite its manifest).
    """
    _test_gate()
    fresh = not workdir.root.exists()
    held = failed = False
    try:
        with workdir.lock():  # refused: LayermoeError here, before anything was looked at
            held = True
            with unchanged_on_bad_input(workdir, fresh=fresh):
                yield
    except BaseException:
        failed = True
        raise
    finally:
        if held and fresh and failed:  # bad input, or a bug that left nothing: no new empty work dir
            _remove_if_empty(workdir.root)


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
    # Whatever was built on this step's old outputs is out of date from now on (the outputs
    # themselves stay until the new ones replace them); bad input rolls this back with the manifest.
    where = manifest.locate(record)
    stale = manifest.invalidate_dependents(*where) if where is not None else []
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
        _say_stale(label, stale)
        raise
    record.status = StepStatus.done
    record.finished_at = utc_now()
    workdir.save(manifest)
    _say_stale(label, stale)


def _say_stale(label: str, stale: list[tuple[int, str]]) -> None:
    if stale:

        err_console.print(f"[yellow]note:[/] {label} ran again, so {describe_steps(stale)} "
                          f"{'is' if len(stale) == 1 else 'are'} now pending (old outputs stay until replaced)",
                          soft_wrap=True, highlight=False)


def require_done(record: StepRecord, what: str, command: str) -> None:
    if record.status != StepStatus.done:
        raise LayermoeError(f"{what} is not done yet ({record.status.value}): run `{command}` first")
