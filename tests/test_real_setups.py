"""Real setups, as users run them (issue 23): clean checkpoints, trackers, several nodes, the eval table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.testing import make_tiny_model

runner = CliRunner()
TRAIN = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--report-to", "none"]


def layermoe(workdir: Path, *args: str):
    return runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "llama", num_layers=2, shared_direction=0.05)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tiny) -> Path:
    """A work dir where profile, allocate and expand of G1 are done."""
    workdir = tmp_path_factory.mktemp("runs") / "run"
    for args in (["profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "400", "--neuron-top-n", "0"],
                 ["allocate", "--budget", "4", "--classifier-layers", "1"], ["expand"]):
        result = layermoe(workdir, *args)
        assert result.exit_code == 0, result.output
    return workdir


def copy_of(expanded: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    return workdir


# ---------------------------------------------------------------- points 4 and 5: clean checkpoints


def assert_clean_checkpoint(checkpoint: Path, tiny: Path) -> None:
    """No path of this machine, no loading option, no run setting in what a checkpoint carries."""
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["base_config"]["_name_or_path"] == tiny.name  # the base's name, not where it lies here
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    for key in ("local_files_only", "is_local", "max_length", "stride", "truncation_strategy", "pad_to_multiple_of"):
        assert key not in tokenizer_config, (checkpoint.name, key)
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())
    assert tokenizer_json["truncation"] is None and tokenizer_json["padding"] is None
    for path in checkpoint.iterdir():
        if path.suffix == ".json":
            assert str(tiny.parent) not in path.read_text(), path.name


LOAD = """
import sys
from transformers import AutoTokenizer, PreTrainedTokenizerFast
path = sys.argv[1]
remote = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
plain = PreTrainedTokenizerFast.from_pretrained(path)  # no remote code at all
text = "Καλημέρα, good morning"
assert remote(text)["input_ids"] == plain(text)["input_ids"]
import layermoe.modeling  # noqa: E402,F401  (registers the model type: AutoTokenizer asks nothing)
assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == plain(text)["input_ids"]
print("loaded", type(remote).__name__)
"""


def test_checkpoints_carry_no_local_path_and_the_tokenizer_loads_without_a_prompt(expanded, tiny, tmp_path):
    workdir = copy_of(expanded, tmp_path)
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output
    for name in ("expanded", "stage1"):
        checkpoint = workdir / "g1" / name
        assert_clean_checkpoint(checkpoint, tiny)
        done = subprocess.run([sys.executable, "-c", LOAD, str(checkpoint)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        assert "loaded" in done.stdout
        assert "Do you wish to run the custom code" not in done.stdout + done.stderr
        assert "model of type" not in done.stderr  # transformers' warning about a model type ''
