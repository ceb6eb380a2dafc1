"""The wheel is the product: built from this tree, installed into a fresh venv, run from a folder
outside the repository. The venv borrows the test environment's dependencies (a .pth line: torch
and the rest are not downloaded again), but layermoe itself comes from the wheel only."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    return next(out.glob("layermoe-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel installed (no deps) and the test environment's packages visible."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies, not layermoe: a plain path line does not run that folder's own .pth files
    # (so the editable install of this checkout stays out)
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return venv


def _run(venv: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    return subprocess.run([str(venv / "bin" / "layermoe"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_the_recipes_and_accelerate_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ("demo", "compare", "compare-gpu", "qwen1.5-1.8b", "llama-3.2-3b"):
        assert f"layermoe/recipes/{recipe}.yaml" in names
    for config in ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3", "single_gpu"):
        assert f"layermoe/recipes/accelerate/{config}.yaml" in names
    for name in ("layermoe_tiny_mc.yaml", "load.py", "tiny_mc.jsonl"):  # the example lm-eval task folder
        assert f"layermoe/recipes/lm-eval-tasks/{name}" in names
    assert "layermoe/compat.py" in names and "layermoe/modeling/modeling_layermoe.py" in names
    assert not any(name.startswith("tests/") for name in names)


def test_installed_tool_finds_its_recipes_by_name_outside_the_repo(installed, tmp_path):
    result = _run(installed, tmp_path, "recipes", "demo")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_file() and str(installed) in str(path) and str(REPO) not in str(path)
    result = _run(installed, tmp_path, "recipes", "fsdp2")
    assert result.returncode == 0 and result.stdout.strip().endswith("layermoe/recipes/accelerate/fsdp2.yaml")
    result = _run(installed, tmp_path, "recipes", "lm-eval-tasks")
    tasks = Path(result.stdout.strip())
    assert result.returncode == 0 and str(installed) in str(tasks) and (tasks / "tiny_mc.jsonl").is_file()
    code = "import layermoe, sys; print(layermoe.__file__)"
    where = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert str(installed) in where.stdout and str(REPO) not in where.stdout


def test_installed_tool_runs_a_tiny_chain_from_a_recipe_outside_the_repo(installed, tmp_path):
    code = ("from layermoe.testing import make_tiny_model; "
            "make_tiny_model('tiny', 'llama', num_layers=2, shared_direction=2.0)")
    subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\nmodel: tiny\ndevice: cpu\ngenerations:\n"
        "  - old: [en]\n    new: [el]\n"
        "    profile: {tokens: 400, batch_tokens: 512, neuron_top_n: 20}\n"
        "    allocate: {budget: 4, classifier_layers: 1}\n"
        "    stage1: {max_steps: 2, seq_len: 32, micro_batch_size: 2, checkpoint_every: 0, report_to: none}\n"
        "    stage2: {max_steps: 1, seq_len: 32, micro_batch_size: 2, checkpoint_every: 0, report_to: none,"
        " docs_per_new_language: 40}\n"
        "    eval: {max_tokens: 200}\n")
    result = _run(installed, tmp_path, "-w", "run", "run", "tiny.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    status = _run(installed, tmp_path, "-w", "run", "status", "--json")
    import json

    manifest = json.loads(status.stdout)
    g1 = manifest["generations"][1]
    assert [g1[s]["status"] for s in ("profile", "allocation", "expansion", "stage1", "stage2", "eval")] == ["done"] * 6
    assert (tmp_path / "run" / "report.md").is_file()
