"""`layermoe env`: the versions, each marked inside or outside the tested range."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core import environment


def test_a_version_outside_the_declared_range_is_marked(monkeypatch):
    monkeypatch.setattr(environment, "declared_ranges", lambda distribution="layermoe": {
        "transformers": ">=5.23", "torch": ">=2.11", "accelerate": ">=1.4"})
    versions = {"transformers": "5.17.0", "torch": "2.13.0+cpu", "accelerate": "1.16.0"}
    monkeypatch.setattr(environment, "installed_version", lambda name: versions.get(name))
    found = environment.environment()
    lines = {p["name"]: p for p in found["packages"]}
    assert lines["transformers"] == {"name": "transformers", "version": "5.17.0", "tested": ">=5.23", "in_range": False}
    assert lines["torch"]["in_range"] is True  # a local build (+cpu) is that release
    assert lines["accelerate"]["in_range"] is True
    assert lines["datasets"] == {"name": "datasets", "version": None, "tested": None, "in_range": None}
    assert found["outside_tested_range"] == ["transformers"]
    result = CliRunner().invoke(app, ["env"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if "transformers" in line)
    assert "5.17.0" in row and ">=5.23" in row and "OUTSIDE the tested range" in row
    assert "untested: transformers" in result.output


def test_env_json_is_the_installed_versions(monkeypatch):
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    found = json.loads(result.stdout)
    from importlib.metadata import version

    import torch
    import transformers

    lines = {p["name"]: p for p in found["packages"]}
    # the distribution's version: PyPI's CUDA wheels say 2.11.0 where torch.__version__ says 2.11.0+cu130
    assert lines["torch"]["version"] == version("torch")
    assert lines["torch"]["version"].split("+")[0] == torch.__version__.split("+")[0]
    assert lines["transformers"]["version"] == transformers.__version__
    assert found["accelerator"]["cuda_available"] == torch.cuda.is_available()
    assert set(found) == {"layermoe", "python", "platform", "accelerator", "packages", "outside_tested_range"}


def test_the_tested_ranges_are_pyprojects_dependencies():
    """One source of truth: `layermoe env` marks against exactly what pyproject.toml declares."""
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert environment.source_pyproject() == pyproject
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    ranges = environment.declared_ranges()
    assert {r.name: str(r.specifier) for r in declared}.items() <= ranges.items()
    for core in ("torch", "transformers", "accelerate", "datasets"):
        assert ranges[core].startswith(">="), core  # a lower bound the suite passed on
    assert ranges["lm-eval"] == str(Requirement(project["optional-dependencies"]["eval"][0]).specifier)


def test_without_tomllib_the_dependencies_array_is_still_read(monkeypatch):
    import sys

    full = environment.source_requirements()
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10
    core = environment.source_requirements()
    assert core and core == full[:len(core)] and "torch" in core[0]
    assert not any(line.startswith("pytest") for line in core)


def test_an_installed_wheel_reads_its_metadata(monkeypatch):
    monkeypatch.setattr(environment, "source_pyproject", lambda: None)
    monkeypatch.setattr(environment.metadata, "requires", lambda dist: ["transformers>=9.1", "torch>=3; extra == 'x'"])
    assert environment.declared_ranges() == {"transformers": ">=9.1", "torch": ">=3"}
