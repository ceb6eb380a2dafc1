"""`layermoe prepare`: the step, train on prepared data (also under 2-process DDP), a kill in the
middle, bad input, and progress lines in a log."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.manifest import StepStatus
from layermoe.core.workdir import Workdir
from layermoe.data import DataSelection, Source, builtin_corpus_path, prepare
from layermoe.data.split import _unit_hash
from layermoe.testing import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TRAIN = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "0"]


def layermoe(workdir: Path, *args: str):
    return runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})


def _lines(code, n):
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if line.startswith(code + "\t")][:n]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> Path:
    """A work dir with G1 = el (from a .txt file) over G0 = en (builtin), profiled, allocated and expanded."""
    root = tmp_path_factory.mktemp("prep")
    tiny = make_tiny_model(root / "tiny", "llama", num_layers=2, shared_direction=0.05)
    (root / "el.txt").write_text("\n".join(_lines("el", 400)) + "\n", encoding="utf-8")
    workdir = root / "run"
    for args in (["profile", "--model", str(tiny), "--old", "en", "--new", "el", "--data", f"el={root / 'el.txt'}",
                  "--tokens", "300"], ["allocate", "--budget", "4", "--classifier-layers", "1"], ["expand"]):
        result = layermoe(workdir, *args)
        assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture()
def workdir(tmp_path, expanded) -> Path:
    """A private copy of the expanded work dir (its data file stays shared and read-only)."""
    copy = tmp_path / "run"
    shutil.copytree(expanded, copy)
    manifest = Workdir(copy).load()
    source = manifest.generations[1].data["el"]
    source.spec = Workdir(copy).rel(Workdir(expanded).resolve(source.spec))  # the copy sits elsewhere
    Workdir(copy).save(manifest)
    return copy


def _point_el_at(workdir: Path, path: Path, kind: str) -> None:
    manifest = Workdir(workdir).load()
    manifest.generations[1].data["el"].spec = Workdir(workdir).rel(path)
    manifest.generations[1].data["el"].kind = kind
    Workdir(workdir).save(manifest)


# ---------------------------------------------------------------- the step


def test_train_prepares_first_and_a_new_preparation_makes_the_stage_pending(workdir):
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output
    g1 = Workdir(workdir).load().generations[1]
    assert g1.prepare1.status == StepStatus.done and g1.stage1.status == StepStatus.done
    assert g1.prepare1.data_dir == f"cache/prepared/{g1.prepare1.key}"
    assert g1.stage1.metrics["data"]["prepared"] == g1.prepare1.data_dir
    assert g1.prepare1.documents_per_language == {"el": g1.stage1.metrics["data"]["documents_per_language"]["el"]}
    first = g1.prepare1.data_dir

    result = layermoe(workdir, "prepare", "--stage", "1")
    assert result.exit_code == 0
    assert f"stage 1 data of G1 is prepared already ({first}; use --force to prepare it again)" in result.output

    result = layermoe(workdir, "prepare", "--stage", "1", "--tokens-per-language", "500")
    assert result.exit_code == 0, result.output
    assert ("note: preparing stage 1 data of G1 ran again, so stage1 of G1 is now pending "
            "(old outputs stay until replaced)") in result.stderr
    g1 = Workdir(workdir).load().generations[1]
    assert g1.stage1.status == StepStatus.pending and g1.prepare1.data_dir != first
    assert 500 <= g1.prepare1.tokens_per_language["el"] < 700
    assert not (workdir / first).exists()  # nothing points at the old data any more
    # train keeps the prepared settings (it does not prepare again without the budget)
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output
    g1 = Workdir(workdir).load().generations[1]
    assert g1.stage1.config["tokens_per_language"] == 500
    assert g1.stage1.metrics["data"]["prepared"] == g1.prepare1.data_dir


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_two_process_ddp_trains_from_prepared_data_without_tokenising_again(workdir):
    result = layermoe(workdir, "prepare", "--stage", "1", "--num-proc", "1")
    assert result.exit_code == 0, result.output
    manifest = Workdir(workdir).load()
    prepared = workdir / manifest.generations[1].prepare1.data_dir
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.iterdir()}
    # The source now holds bytes that cannot be read as UTF-8, with its size and modification time
    # kept (so its identity, and the cache key, are unchanged): any new tokenising would fail.
    source = Workdir(workdir).resolve(manifest.generations[1].data["el"].spec)
    saved, stat = source.read_bytes(), source.stat()
    try:
        source.write_bytes(b"\xff" * stat.st_size)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes/accelerate/cpu_ddp_2proc.yaml"), "--main_process_port", str(_free_port()),
               "-m", "layermoe", "-w", str(workdir), "train", "--stage", "1", *TRAIN]
        run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=workdir.parent)
    finally:
        source.write_bytes(saved)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run.returncode == 0, run.stderr[-3000:]
    g1 = Workdir(workdir).load().generations[1]
    assert g1.stage1.status == StepStatus.done
    digests = g1.stage1.metrics["trainable_checksum_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert g1.stage1.metrics["data"]["blocks_per_step"] == 4  # 2 per rank x 2 ranks
    assert g1.stage1.metrics["data"]["prepared"] == g1.prepare1.data_dir
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.iterdir()} == before
    assert sorted(p.name for p in prepared.parent.iterdir()) == [".lock", prepared.name]


# ---------------------------------------------------------------- a kill in the middle


_PREPARE = """
import json, os, signal, sys
from layermoe.data import DataSelection, Source, prepare
from layermoe.testing import make_tiny_tokenizer
a = json.loads(open(sys.argv[1]).read())
def on_progress(language, stats):
    if language == os.environ.get("KILL_IN") and stats["documents_read"] >= 150:
        os.kill(os.getpid(), signal.SIGKILL)
sources = {lang: Source(lang, spec) for lang, spec in a["sources"].items()}
prepare(sources, a["gens"], 1, DataSelection(stage=1, seed=4), make_tiny_tokenizer(), a["root"], num_proc=2,
        chunk_bytes=1024, on_progress=on_progress, show_progress=False)
"""


def _alive(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_sigkill_during_prepare_then_prepare_again_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "el.txt").write_text("\n".join(_lines("el", 600)) + "\n", encoding="utf-8")
    (tmp_path / "hu.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _lines("hu", 600)), encoding="utf-8")
    sources = {"el": str(tmp_path / "el.txt"), "hu": str(tmp_path / "hu.jsonl")}
    gens = {"el": 1, "hu": 1}
    script, args = tmp_path / "prepare_run.py", tmp_path / "args.json"
    script.write_text(_PREPARE)
    args.write_text(json.dumps({"sources": sources, "gens": gens, "root": str(tmp_path / "prep")}))
    env = {**_env(), "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}

    killed = subprocess.run([sys.executable, str(script), str(args)], env={**env, "KILL_IN": "hu"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    deadline = time.monotonic() + 10
    while _alive(str(script)) and time.monotonic() < deadline:  # the workers die with the main process
        time.sleep(0.2)
    assert not _alive(str(script))
    names = sorted(p.name for p in (tmp_path / "prep").iterdir())
    assert len(names) == 2 and names[0] == ".lock" and names[1].startswith(".partial-")  # nothing visible
    assert [s["language"] for s in json.loads((tmp_path / "prep" / names[1] / "progress.json").read_text())["done"]] == ["el"]

    again = subprocess.run([sys.executable, str(script), str(args)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    reference = prepare({lang: Source(lang, spec) for lang, spec in sources.items()}, gens, 1, DataSelection(stage=1, seed=4),
                        make_tiny_tokenizer(), tmp_path / "reference", num_proc=1, show_progress=False)
    resumed = tmp_path / "prep" / reference.path.name
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [".lock", reference.path.name]
    for name in ("tokens.bin", "lengths.npy", "order.npy"):
        assert (resumed / name).read_bytes() == (reference.path / name).read_bytes(), name
    assert json.loads((resumed / "meta.json").read_text())["stats"] == reference.meta["stats"]
    assert not (tmp_path / "hf").exists() or not any(p.is_file() for p in (tmp_path / "hf").rglob("*"))


# ---------------------------------------------------------------- bad input


def _single_heldout_text() -> str:
    return next(t for t in (f"μόνο ένα κείμενο {i}" for i in range(10_000)) if _unit_hash(t) < 0.05)


@pytest.mark.parametrize("case", ["bad json", "missing field", "dangling link", "all held out"])
def test_bad_data_is_one_line_and_leaves_the_work_dir_unchanged(tmp_path, workdir, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "bad json":
        path, kind = data / "el.jsonl", "jsonl"
        path.write_text('{"text": "ένα"}\n\n{not json\n', encoding="utf-8")
        message = (f"data for 'el': {path} line 3 is not valid JSON (Expecting property name enclosed in double quotes "
                   "at column 2): fix or remove that line")
    elif case == "missing field":
        path, kind = data / "el.jsonl", "jsonl"
        path.write_text('{"body": "ένα", "id": 1}\n', encoding="utf-8")
        message = f"data for 'el': {path} has no field 'text' (fields: body, id): rename the field or choose another text field"
    elif case == "dangling link":
        path, kind = data, "dir"
        (data / "a.txt").write_text("ένα\nδύο\n", encoding="utf-8")
        (data / "b.txt").symlink_to(tmp_path / "moved-away.txt")
        message = f"data for 'el': cannot read {data / 'b.txt'} in {data}: it is a link to a missing file"
    else:
        path, kind = data / "el.txt", "txt"
        path.write_text((_single_heldout_text() + "\n") * 3, encoding="utf-8")  # one distinct text: no fix-up possible
        message = ("data for 'el': no training documents: all 3 of its documents are held out for evaluation "
                   "(the 5% split by text hash): give it more documents")
    _point_el_at(workdir, path, kind)
    before = snapshot(workdir)
    result = layermoe(workdir, "prepare", "--stage", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert snapshot(workdir) == before


def test_a_budget_larger_than_the_corpus_is_a_note(workdir):
    result = layermoe(workdir, "prepare", "--stage", "1", "--tokens-per-language", "1000000000")
    assert result.exit_code == 0, result.output
    record = Workdir(workdir).load().generations[1].prepare1
    tokens, documents = record.tokens_per_language["el"], record.documents_per_language["el"]
    assert documents == 380 or 350 < documents < 400  # all of the training side
    assert (f"note: el has {tokens:,} training tokens in {documents:,} documents, fewer than its budget "
            "(1,000,000,000 tokens): all of them are used") in result.stderr


# ---------------------------------------------------------------- progress in a log


def test_without_a_terminal_progress_is_a_plain_line(tmp_path, monkeypatch):
    from rich.console import Console

    from layermoe.core import console as consoles
    from layermoe.core import progress
    from layermoe.training import reporting
    from layermoe.training.reporting import StageReporter as _Reporter

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    plain = Console(file=log, width=300)  # a file, not a terminal
    assert not plain.is_terminal
    prepare({"el": Source("el", texts=["ένα", "δύο", "τρία"])}, {"el": 1}, 1, DataSelection(stage=1), make_tiny_tokenizer(),
            tmp_path / "prep", num_proc=1, console=plain)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("prepare el (1 process): 3 documents")  # LOG_EVERY_S = 0: every chunk
    assert re.fullmatch(r"prepare el \(1 process\): 3 documents \([\d,.]+/s\), \d+ tokens \([\d,.]+M?/s\), \d+ s — done", lines[-1]), lines

    monkeypatch.setattr(consoles, "err_console", plain)
    monkeypatch.setattr(reporting, "err_console", plain)  # the reporter's own reference
    log.truncate(0), log.seek(0)
    from types import SimpleNamespace

    no_trackers = SimpleNamespace(is_main_process=True, log_with=[])  # the accelerator as the reporter sees it
    reporter = _Reporter(tmp_path / "log.jsonl", total_steps=3, start_step=0, show_progress=True, accelerator=no_trackers,
                         run_config={}, run_name="g1-stage1")
    reporter.step(1, None)
    reporter.step(2, {"loss": 1.23456, "step": 2, "tokens_per_s": 1234.4, "elapsed_s": 2.2, "eta_s": 1.1})
    reporter.close()
    assert log.getvalue().splitlines() == [
        "stage training: step 1/3",
        "stage training: step 2/3, loss 1.2346 (step 2), 1,234 tok/s, 2 s elapsed, about 1 s to go",
    ]
