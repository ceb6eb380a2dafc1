"""Weights checked against the disk: checksums recorded when a step writes a model, verified
whenever one is read (the six corruptions of issue 10, a truncated file), `--no-verify`."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.manifest import StepStatus
from layermoe.core.workdir import Workdir
from layermoe.testing import make_tiny_model

runner = CliRunner()
LAYERS = 4
TRAIN = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "1"]


def layermoe(workdir: Path, *args: str, ok: bool = True):
    result = runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})
    if ok:
        assert result.exit_code == 0, (args, result.output)
    return result


def one_line_error(result, *parts: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def tensor_range(path: Path, name: str) -> tuple[int, int, str]:
    """Absolute byte range and dtype of one tensor of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    begin, end = header[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end, header[name]["dtype"]


def poke(path: Path, name: str) -> None:
    """Change the first float of one tensor in place, as a bit flip or a stray edit would."""
    begin, _, dtype = tensor_range(path, name)
    assert dtype == "F32"
    with open(path, "r+b") as f:
        f.seek(begin)
        (value,) = struct.unpack("<f", f.read(4))
        f.seek(begin)
        f.write(struct.pack("<f", value + 0.5))


def tensor_names(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return [n for n in json.loads(f.read(length)) if n != "__metadata__"]


def first(path: Path, *needles: str) -> str:
    return next(n for n in tensor_names(path) if all(x in n for x in needles))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/tiny (the base model), root/g1 (G1 trained), root/g2 (G1 trained, then G2 opened and trained)."""
    root = tmp_path_factory.mktemp("integrity")
    tiny = make_tiny_model(root / "tiny", "llama", num_layers=LAYERS, shared_direction=0.05)
    g1 = root / "g1"
    layermoe(g1, "profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "300")
    layermoe(g1, "allocate", "--budget", "7", "--classifier-layers", "1")
    layermoe(g1, "expand")
    layermoe(g1, "train", "--stage", "1", *TRAIN)
    layermoe(g1, "train", "--stage", "2", *TRAIN)
    g2 = root / "g2"
    shutil.copytree(g1, g2)
    layermoe(g2, "extend", "--new", "bn", "--budget", "6", "--tokens", "300", "--drift-tokens", "100", "--classifier-layers", "1")
    layermoe(g2, "train", "--stage", "1", *TRAIN)
    layermoe(g2, "train", "--stage", "2", *TRAIN)
    return root


@pytest.fixture
def copy(runs, tmp_path):
    """A private copy of the runs (and the base model, same relative layout) to corrupt."""
    for name in ("tiny", "g1", "g2"):
        shutil.copytree(runs / name, tmp_path / name)
    return tmp_path


def unchanged(workdir: Path):
    before = (workdir / "manifest.json").read_bytes()
    return lambda: (workdir / "manifest.json").read_bytes() == before


# ---------------------------------------------------------------- what is recorded


def test_streaming_checksums_match_a_slow_reference(runs, monkeypatch):
    from safetensors.torch import load_file

    from layermoe.core import integrity

    path = runs / "g2" / "g2" / "stage2" / "model.safetensors"
    monkeypatch.setattr(integrity, "CHUNK", 7)  # chunks that cut through tensors and the header
    digest, tensors = integrity.safetensors_checksums(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(str(path))
    assert set(tensors) == set(loaded)
    for name, tensor in loaded.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        assert tensors[name] == hashlib.sha256(raw).hexdigest()[: integrity.TENSOR_DIGEST_CHARS], name


def test_every_model_writing_step_records_its_files(runs):
    manifest = Workdir(runs / "g2").load()
    for generation in manifest.generations[1:]:
        for step in ("expansion", "stage1", "stage2"):
            record = generation.step(step)
            files = record.checkpoint_files
            assert "model.safetensors" in files and "config.json" in files, (generation.index, step)
            weights = runs / "g2" / record.checkpoint / "model.safetensors"
            assert files["model.safetensors"].sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
            assert set(files["model.safetensors"].tensors) == set(tensor_names(weights))
    base = manifest.base_model
    assert set(base.tensor_sha256["model.safetensors"]) == set(tensor_names(runs / "tiny" / "model.safetensors"))
    state = json.loads(next((runs / "g2" / "g2" / "stage2-run" / "checkpoints").glob("step-*/state.json")).read_text())
    assert set(state["files"]) >= {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt"}


# ---------------------------------------------------------------- the six corruptions


def test_expert0_edited_in_a_stage2_checkpoint_is_refused_by_eval(copy):
    workdir = copy / "g2"
    weights = workdir / "g2" / "stage2" / "model.safetensors"
    name = first(weights, "mlp.expert0.down_proj")
    poke(weights, name)
    same = unchanged(workdir)
    result = layermoe(workdir, "eval", "--max-tokens", "50", ok=False)
    one_line_error(result, "g2/stage2/model.safetensors", f"tensor {name} changed",
                   "run `layermoe train --stage 2 --force`", "--no-verify")
    assert same()


def test_a_g1_expert_edited_in_a_g2_checkpoint_is_refused_by_train(copy):
    workdir = copy / "g2"
    weights = workdir / "g2" / "stage1" / "model.safetensors"
    name = first(weights, "mlp.experts.g1.")
    poke(weights, name)
    same = unchanged(workdir)
    result = layermoe(workdir, "train", "--stage", "2", "--force", *TRAIN, ok=False)
    one_line_error(result, "g2/stage1/model.safetensors", f"tensor {name} changed", "stage 1 of G2")
    assert same()


def test_an_embedding_edited_before_extend_is_refused(copy):
    workdir = copy / "g1"
    weights = workdir / "g1" / "stage2" / "model.safetensors"
    name = first(weights, "embed_tokens")
    poke(weights, name)
    same = unchanged(workdir)
    result = layermoe(workdir, "extend", "--new", "bn", "--budget", "6", "--tokens", "300", ok=False)
    one_line_error(result, "g1/stage2/model.safetensors", f"tensor {name} changed")
    assert same() and not (workdir / "g2").exists()


def test_expert0_edited_in_g2_expanded_is_refused_by_train(copy):
    workdir = copy / "g2"
    weights = workdir / "g2" / "expanded" / "model.safetensors"
    name = first(weights, "mlp.expert0.gate_proj")
    poke(weights, name)
    same = unchanged(workdir)
    result = layermoe(workdir, "train", "--stage", "1", "--force", *TRAIN, ok=False)
    one_line_error(result, "g2/expanded/model.safetensors", f"tensor {name} changed", "run `layermoe expand --force`")
    assert same()


def test_base_weights_changed_after_profile_are_refused(copy):
    workdir = copy / "g1"
    weights = copy / "tiny" / "model.safetensors"
    name = first(weights, "layers.2.mlp.up_proj")
    poke(weights, name)
    same = unchanged(workdir)
    result = layermoe(workdir, "eval", "--model", "base", "--max-tokens", "50", "--force", ok=False)
    one_line_error(result, f"the base model's {weights.resolve()}", f"tensor {name} changed")
    assert same()


def test_router_edited_in_a_resume_checkpoint_is_refused(copy):
    workdir = copy / "g2"
    checkpoint = next((workdir / "g2" / "stage2-run" / "checkpoints").glob("step-*"))
    weights = checkpoint / "trainable.safetensors"
    name = first(weights, "mlp.router")
    poke(weights, name)
    manifest = Workdir(workdir).load()  # as if stage 2 had been killed after that checkpoint
    manifest.generations[2].stage2.status = StepStatus.running
    Workdir(workdir).save(manifest)
    same = unchanged(workdir)
    result = layermoe(workdir, "train", "--stage", "2", *TRAIN, ok=False)
    # verified before the "resuming from" notice: the refusal is the only line (issue 24, 7)
    one_line_error(result, str(weights), f"tensor {name} changed", "a resume checkpoint", f"delete {checkpoint}")
    assert same()


# ---------------------------------------------------------------- truncated files, --no-verify


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("checkpoint, command, fix", [
    ("g1/expanded", ["train", "--stage", "1", "--force", *TRAIN], "layermoe expand --force"),
    ("g1/stage2", ["eval", "--max-tokens", "50"], "layermoe train --stage 2 --force"),
])
def test_a_truncated_checkpoint_is_one_line_and_no_failed_step(copy, verify, checkpoint, command, fix):
    workdir = copy / "g1"
    weights = workdir / checkpoint / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    same = unchanged(workdir)
    result = layermoe(workdir, *([] if verify else ["--no-verify"]), *command, ok=False)
    # (with --no-verify too: a truncated file would make the loader fail with a traceback)
    line = one_line_error(result, f"{checkpoint}/model.safetensors", f"truncated ({size // 2:,} of {size:,} bytes)")
    assert fix in line
    assert same()  # the step is not marked failed


def test_no_verify_loads_a_changed_checkpoint_with_a_warning(copy):
    workdir = copy / "g2"
    weights = workdir / "g2" / "stage2" / "model.safetensors"
    poke(weights, first(weights, "mlp.expert0.down_proj"))
    result = layermoe(workdir, "--no-verify", "eval", "--max-tokens", "50")
    warnings = [line for line in result.stderr.splitlines() if "--no-verify" in line]
    assert warnings == ["warning: --no-verify: models and checkpoints are read without checking them against their "
                        "recorded sha256"]
