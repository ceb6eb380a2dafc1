"""The work dir: lock, rollback on bad input, step bookkeeping."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import Generation, Manifest, StepStatus
from layermoe_cli.workdir import (
    StepAlreadyDone,
    Workdir,
    require_done,
    run_step,
    session,
    unchanged_on_bad_input,
)


def _manifest():
    return Manifest(generations=[Generation(index=0, new_languages=["en"]),
                                 Generation(index=1, old_languages=["en"], new_languages=["el"])])


def test_second_process_is_refused_with_holder_pid_and_host(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import time; from layermoe_cli.workdir import Workdir\n"
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
