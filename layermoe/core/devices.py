"""The device and dtype a command runs on, from its --device and --dtype options."""

from __future__ import annotations

from layermoe.core.errors import LayermoeError


def resolve_device(device: str) -> str:
    import torch  # lazy: the CLI imports this module before it knows torch is needed

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LayermoeError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayermoeError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return device


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str, device: str):
    """The torch dtype of a --dtype option on `device`: auto is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch_dtype("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPE_NAMES:
        raise LayermoeError(f"unknown dtype {dtype!r}: use auto, float32 or bfloat16")
    return torch_dtype(DTYPE_NAMES[dtype])


def torch_dtype(name: str):
    import torch  # lazy, as above

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[DTYPE_NAMES[name]]


def dtype_name(dtype) -> str:
    """float32 | bfloat16, as manifests and cache keys name a torch dtype."""
    return str(dtype).removeprefix("torch.")
