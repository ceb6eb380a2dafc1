"""What several pipeline steps share: devices, dtypes, progress bars, which model a step works on."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from layermoe_cli.console import err_console
from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import Generation, Manifest, StepStatus
from layermoe_cli.workdir import Workdir


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LayermoeError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayermoeError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in choices:
        raise LayermoeError(f"unknown dtype {dtype!r}: use auto, float32 or bfloat16")
    return choices[dtype]


@contextmanager
def token_progress(description: str) -> Iterator:
    """A Rich progress bar on stderr; yields `update(task_label, done, total)`."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, int] = {}
    started: dict[str, float] = {}
    last_event = [time.perf_counter()]

    def update(label: str, done: int, total: int) -> None:
        # The first report of a label comes after its first batch: its clock starts at the previous report.
        now = time.perf_counter()
        if label not in tasks:
            tasks[label] = progress.add_task(f"{description} {label}", total=total, rate="")
            started[label] = last_event[0]
        last_event[0] = now
        elapsed = now - started[label]
        rate = f"{done / elapsed:,.0f} tok/s" if elapsed > 0 else ""
        progress.update(tasks[label], completed=done, total=total, rate=rate)

    with progress:
        yield update


def latest_checkpoint(generation: Generation) -> str | None:
    """The newest model of a generation: stage 2, else stage 1, else the expansion."""
    for record in (generation.stage2, generation.stage1):
        if record.status == StepStatus.done and record.checkpoint:
            return record.checkpoint
    if generation.expansion.status == StepStatus.done:
        return generation.expansion.checkpoint
    return None


def base_source(workdir: Workdir, manifest: Manifest):
    """Where the base model recorded in the manifest is (paths are relative to the work dir): a ModelSource."""
    from layermoe_cli.models import resolve_model_spec

    base = manifest.base_model
    spec = {"hub": base.hub_id, "demo": "demo"}.get(base.kind) or str(workdir.resolve(base.path))
    if base.kind in ("local", "gguf") and not Path(spec).exists():
        if base.absolute_path and Path(base.absolute_path).exists():
            spec = base.absolute_path  # the work dir moved but the model did not
        else:
            raise LayermoeError(
                f"the base model is not at {spec} (stored relative to the work dir as {base.path}): "
                "copy it there, next to the moved work dir"
            )
    return resolve_model_spec(spec, revision=base.revision)


def load_base(workdir: Workdir, manifest: Manifest, device: str = "cpu", dtype=None):
    """Load the base model recorded in the manifest."""
    import torch

    from layermoe_cli.models import load_model

    return load_model(base_source(workdir, manifest), device=device, dtype=dtype or torch.float32,
                      cache_dir=workdir.cache_dir / "models")


def load_generation_model(workdir: Workdir, manifest: Manifest, generation: Generation, device: str, dtype=None):
    """The model a step of `generation` reads: the base model for G1, the previous generation's for later ones."""
    if generation.index <= 1:
        return load_base(workdir, manifest, device=device, dtype=dtype)
    previous = manifest.generations[generation.index - 1]
    checkpoint = latest_checkpoint(previous)
    if checkpoint is None:
        raise LayermoeError(f"G{previous.index} has no model yet: run `layermoe expand` (and train) for it first")
    return load_checkpoint(workdir.resolve(checkpoint), device=device, dtype=dtype)


def load_checkpoint(path: str | Path, device: str = "cpu", dtype=None):
    import torch
    from transformers import AutoTokenizer

    from layermoe_cli.modeling import load_layermoe

    model = load_layermoe(path, device=device, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def documents_for_tokens(tokens: int | None) -> int | None:
    """How many documents to read for a token budget: generous (short documents), but bounded for huge corpora."""
    return None if tokens is None else max(1000, tokens // 20)


def texts_for(workdir: Workdir, generation: Generation, language: str, split: str, limit: int | None = None) -> list[str]:
    """Documents of one language from the data source recorded for it (train or held-out side), at most `limit`."""
    from layermoe_cli.data import load_texts

    source = generation.data[language]
    spec = source.spec
    if source.kind not in ("builtin", "hf"):
        spec = str(workdir.resolve(spec))
    return load_texts(language, spec, split=split, limit=limit, cache_dir=workdir.cache_dir / "datasets",
                      text_field=source.text_field)
