"""The work dir: lock, rollback on bad input, step bookkeeping."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import BaseModelRecord, Generation, Manifest, StepStatus
from layermoe.core.workdir import StepAlreadyDone, Workdir, require_done, run_step, session, unchanged_on_bad_input

BASE = BaseModelRecord(spec="../models/tiny", kind="local")


def _manifest():
    return Manifest(base_model=BASE, generations=[Generation(index=0, new_languages=["en"]),
                                 Generation(index=1, old_languages=["en"], new_languages=["el"])])


def test_second_process_is_refused_with_holder_pid_and_host(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import time; from layermoe.core.workdir import Workdir\n"
         f"with Workdir({str(tmp_path)!r}).lock():\n    print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LayermoeError) as info:
            with Workdir(tmp_path).lock():
                pass
        message = str(info.value)
        assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in message
        assert message.endswith("wait for it to finish or stop it")
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: flock is released with the process, so we get in.
    with Workdir(tmp_path).lock():
        assert json.loads((tmp_path / ".layermoe.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".layermoe.lock").exists()


def test_bad_input_restores_manifest_and_removes_new_files(tmp_path):
    workdir = Workdir(tmp_path / "w")
    workdir.save(_manifest())
    (workdir.root / "keep.txt").write_text("old")
    before = workdir.manifest_path.read_bytes()
    with pytest.raises(LayermoeError):
        with session(workdir):
            manifest = workdir.load()
            manifest.generations[1].new_languages.append("hu")
            workdir.save(manifest)
            (workdir.root / "g1").mkdir()
            (workdir.root / "g1" / "half.png").write_text("x")
            (workdir.root / "keep.txt").write_text("old")
            raise LayermoeError("bad")
    assert workdir.manifest_path.read_bytes() == before
    assert sorted(p.name for p in workdir.root.iterdir()) == ["keep.txt", "manifest.json"]


def test_bad_input_in_a_new_workdir_leaves_nothing(tmp_path):
    workdir = Workdir(tmp_path / "fresh")
    with pytest.raises(LayermoeError):
        with session(workdir):
            workdir.save(_manifest())
            raise LayermoeError("bad")
    assert not workdir.root.exists()


def test_a_bug_is_not_rolled_back(tmp_path):
    workdir = Workdir(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with unchanged_on_bad_input(workdir):
            (tmp_path / "evidence.txt").write_text("x")
            1 / 0
    assert (tmp_path / "evidence.txt").exists()


def test_step_transitions_are_persisted(tmp_path):
    workdir = Workdir(tmp_path)
    manifest = _manifest()
    record = manifest.generations[1].profile
    with run_step(workdir, manifest, record, "profile of G1", {"tokens": 5}):
        on_disk = workdir.load().generations[1].profile
        assert on_disk.status == StepStatus.running
        assert on_disk.pid == os.getpid() and on_disk.config == {"tokens": 5}
    on_disk = workdir.load().generations[1].profile
    assert on_disk.status == StepStatus.done
    assert on_disk.finished_at >= on_disk.started_at

    with pytest.raises(StepAlreadyDone, match=r"^profile of G1 is done already \(use --force to redo it\)$"):
        with run_step(workdir, manifest, record, "profile of G1", {}):
            pass
    with run_step(workdir, manifest, record, "profile of G1", {"tokens": 6}, force=True):
        pass
    assert workdir.load().generations[1].profile.config == {"tokens": 6}


def test_a_crash_marks_the_step_failed(tmp_path):
    workdir = Workdir(tmp_path)
    manifest = _manifest()
    with pytest.raises(RuntimeError):
        with run_step(workdir, manifest, manifest.generations[1].stage1, "stage 1", {}):
            raise RuntimeError("out of memory")
    record = workdir.load().generations[1].stage1
    assert record.status == StepStatus.failed
    assert record.error == "RuntimeError: out of memory"


def test_step_left_running_by_a_dead_process_is_detected(tmp_path):
    workdir = Workdir(tmp_path)
    manifest = _manifest()
    record = manifest.generations[1].stage1
    record.status, record.pid, record.host = StepStatus.running, 999999, "elsewhere"
    seen = []
    with run_step(workdir, manifest, record, "stage 1", {}, on_stale=lambda r: seen.append((r.pid, r.host))):
        pass
    assert seen == [(999999, "elsewhere")]
    assert record.status == StepStatus.done


def test_require_done_names_the_command():
    manifest = _manifest()
    with pytest.raises(LayermoeError, match=r"^allocation of G1 is not done yet \(pending\): run `layermoe allocate --budget N` first$"):
        require_done(manifest.generations[1].allocation, "allocation of G1", "layermoe allocate --budget N")


def test_paths_are_stored_relative(tmp_path):
    workdir = Workdir(tmp_path / "w")
    assert workdir.rel(tmp_path / "w" / "g1" / "profile.png") == "g1/profile.png"
    assert workdir.rel(tmp_path / "models" / "tiny") == "../models/tiny"
    assert workdir.resolve("g1/profile.png") == (tmp_path / "w" / "g1" / "profile.png").resolve()


# --- a refused process touches nothing (two real processes, the gap widened by a test gate) ------

_HOLDER = """
import sys
from layermoe.core.manifest import BaseModelRecord, Generation, Manifest
from layermoe.core.workdir import Workdir, session
workdir = Workdir(sys.argv[1])
with session(workdir):
    if not workdir.has_manifest():
        workdir.save(Manifest(base_model=BaseModelRecord(spec="m", kind="local"),
                              generations=[Generation(index=0, new_languages=["en"])]))
    (workdir.root / "g1").mkdir(exist_ok=True)
    (workdir.root / "g1" / "work.bin").write_bytes(b"holder")
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _refused_while_another_holds(workdir_path, tmp_path, command):
    """Start `command` (a layermoe CLI call) paused right before it tries the lock; let a holder take
    the lock in that gap; let the command go on. Returns (holder process, the command's result)."""
    gate = tmp_path / "gate"
    env = {**os.environ, "LAYERMOE_TEST_LOCK_GATE": str(gate)}
    refused = subprocess.Popen([sys.executable, "-m", "layermoe", "-w", str(workdir_path), *command], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "gate.waiting", refused)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    (tmp_path / "gate.go").write_text("")
    out, err = refused.communicate(timeout=120)
    return holder, refused.returncode, err


def _finish(holder):
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def test_refused_process_leaves_the_holders_fresh_workdir_alone(tmp_path):
    workdir = tmp_path / "fresh"
    holder, code, err = _refused_while_another_holds(workdir, tmp_path, ["profile", "--model", "demo", "--old", "en", "--new", "el"])
    try:
        assert code == 2 and f"is in use by pid {holder.pid}" in err, err
        assert (workdir / "g1" / "work.bin").read_bytes() == b"holder"
        assert (workdir / "manifest.json").is_file()
        assert json.loads((workdir / ".layermoe.lock").read_text())["pid"] == holder.pid
    finally:
        _finish(holder)
    assert (workdir / "g1" / "work.bin").is_file()


def test_refused_process_keeps_the_holders_lock_and_manifest(tmp_path):
    workdir = Workdir(tmp_path / "w")
    workdir.save(_manifest())
    manifest = workdir.manifest_path
    inode, content = manifest.stat().st_ino, manifest.read_bytes()
    holder, code, err = _refused_while_another_holds(workdir.root, tmp_path, ["allocate", "--budget", "10"])
    try:
        assert code == 2 and f"is in use by pid {holder.pid}" in err, err
        # the holder's lock file is still there, so a third process is refused too
        assert json.loads((workdir.root / ".layermoe.lock").read_text())["pid"] == holder.pid
        with pytest.raises(LayermoeError, match=f"is in use by pid {holder.pid}"):
            with workdir.lock():
                pass
        # the refused process did not write the manifest (same inode, same bytes) nor remove the holder's files
        assert manifest.stat().st_ino == inode and manifest.read_bytes() == content
        assert (workdir.root / "g1" / "work.bin").read_bytes() == b"holder"
    finally:
        _finish(holder)


def test_atomic_writes_keep_the_files_mode_or_follow_the_umask(tmp_path):
    from layermoe.core.workdir import atomic_write_text

    path = tmp_path / "manifest.json"
    saved = os.umask(0o022)
    try:
        atomic_write_text(path, "first")  # a new file: the umask default, as open() would give
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        atomic_write_text(path, "second")  # an existing file keeps its mode
        assert path.stat().st_mode & 0o777 == 0o640 and path.read_text() == "second"
    finally:
        os.umask(saved)


def test_a_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from layermoe.cli import app

    runner = CliRunner()
    afile = tmp_path / "notadir"
    afile.write_text("x")
    result = runner.invoke(app, ["-w", str(afile), "allocate", "--budget", "10"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: work dir {afile} is a file, not a directory: pass another --workdir"]
    assert afile.read_text() == "x"

    workdir = Workdir(tmp_path / "w")
    workdir.save(_manifest())
    before = sorted(p.name for p in workdir.root.iterdir())
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".layermoe.lock") or flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    result = runner.invoke(app, ["-w", str(workdir.root), "allocate", "--budget", "10"])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write in work dir {workdir.root} (Read-only file system)"), lines
    assert sorted(p.name for p in workdir.root.iterdir()) == before


def test_a_bug_in_a_fresh_workdir_leaves_no_empty_workdir(tmp_path):
    workdir = Workdir(tmp_path / "fresh")
    with pytest.raises(ZeroDivisionError):
        with session(workdir):
            (workdir.root / "g1").mkdir()
            1 / 0
    assert not workdir.root.exists()
    # ... but a bug that left evidence keeps it
    with pytest.raises(ZeroDivisionError):
        with session(workdir):
            workdir.save(_manifest())
            1 / 0
    assert workdir.has_manifest()


# --- a step run again makes every step built on it out of date ---------------------------------


def _all_done(generations=3):
    manifest = Manifest(base_model=BASE, generations=[Generation(index=0, new_languages=["en"])] + [
        Generation(index=g, old_languages=["en"], new_languages=[f"l{g}"]) for g in range(1, generations)])
    for generation in manifest.generations[1:]:
        for name in ("profile", "allocation", "expansion", "stage1", "stage2", "eval"):
            generation.step(name).status = StepStatus.done
    manifest.generations[0].eval.status = StepStatus.done
    return manifest


def _states(manifest):
    return {(g.index, name): g.step(name).status.value for g in manifest.generations[1:]
            for name in ("profile", "allocation", "expansion", "stage1", "stage2", "eval")}


@pytest.mark.parametrize("generation, step, stale", [
    (1, "stage1", {(1, "stage2"), (1, "eval")} | {(2, s) for s in ("profile", "allocation", "expansion", "stage1", "stage2", "eval")}),
    (1, "profile", {(1, s) for s in ("allocation", "expansion", "stage1", "stage2", "eval")}
     | {(2, s) for s in ("profile", "allocation", "expansion", "stage1", "stage2", "eval")}),
    (2, "expansion", {(2, "stage1"), (2, "stage2"), (2, "eval")}),
    (2, "stage2", {(2, "eval")}),
    (1, "eval", set()),
])
def test_a_step_run_again_marks_every_dependent_step_pending(tmp_path, capsys, generation, step, stale):
    workdir = Workdir(tmp_path)
    manifest = _all_done()
    record = manifest.generations[generation].step(step)
    label = f"{step} of G{generation}"
    with run_step(workdir, manifest, record, label, {}, force=True):
        pass
    states = _states(workdir.load())
    assert {key for key, state in states.items() if state == "pending"} == stale
    assert manifest.generations[0].eval.status == StepStatus.done  # the base model's figures stand
    notes = [line for line in capsys.readouterr().err.splitlines() if "now pending" in line]
    assert len(notes) == (1 if stale else 0), notes
    if stale:
        assert notes[0].startswith(f"note: {label} ran again, so ")
        assert notes[0].endswith(f"{'is' if len(stale) == 1 else 'are'} now pending (old outputs stay until replaced)")


def test_the_step_graph_is_one_table():
    from layermoe.core.manifest import MODEL_STEPS, STEP_INPUTS, STEP_NAMES

    assert STEP_NAMES == tuple(STEP_INPUTS)
    assert set(MODEL_STEPS) <= set(STEP_NAMES)
    for name, inputs in STEP_INPUTS.items():  # inputs come before the step
        assert all(STEP_NAMES.index(i) < STEP_NAMES.index(name) for i in inputs)
