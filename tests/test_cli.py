"""The CLI surface: help, errors as one line with exit code 2, status."""

import json

import pytest
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.manifest import BaseModelRecord, Generation, Manifest, StepStatus
from layermoe.core.workdir import Workdir

runner = CliRunner()

COMMANDS = ["profile", "allocate", "expand", "prepare", "train", "eval", "extend", "status", "run", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert f"Example: layermoe {command}" in result.output


def _workdir_with_manifest(path) -> Workdir:
    workdir = Workdir(path)
    manifest = Manifest(
        base_model=BaseModelRecord(spec="../models/tiny", kind="local", path="../models/tiny", num_layers=3,
                                   num_parameters=1_000_000),
        generations=[Generation(index=0, new_languages=["en"]),
                     Generation(index=1, old_languages=["en"], new_languages=["el", "hu"])],
    )
    g1 = manifest.generations[1]
    g1.profile.status = StepStatus.done
    g1.allocation.status = StepStatus.done
    g1.allocation.experts_per_layer = [3, 2, 1]
    g1.allocation.new_experts_per_layer = [2, 1, 0]
    g1.expansion.status = StepStatus.done
    g1.expansion.total_parameters, g1.expansion.active_parameters, g1.expansion.added_parameters = 1_300_000, 1_100_000, 300_000
    workdir.save(manifest)
    return workdir


def test_status_json_is_the_manifest_and_nothing_else(tmp_path):
    workdir = _workdir_with_manifest(tmp_path)
    result = runner.invoke(app, ["-w", str(tmp_path), "status", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads(workdir.manifest_path.read_text())


def test_status_table_shows_lineage_and_parameters(tmp_path):
    _workdir_with_manifest(tmp_path)
    result = runner.invoke(app, ["-w", str(tmp_path), "status"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "G1" in result.output and "en (base)" in result.output and "+ el, hu" in result.output
    assert "6 (3)" in result.output  # 6 experts in all, 3 new
    assert "1.3M / 1.1M" in result.output
    assert "0.3M (+30%)" in result.output


