"""What several pipeline steps share: devices, dtypes, progress bars, which model a step works on."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from layermoe_cli.console import err_console
from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import MODEL_STEPS, DataSourceRecord, FileChecksum, Generation, Manifest, StepStatus
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


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str, device: str):
    """The torch dtype of a --dtype option on `device`: auto is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch_dtype("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPE_NAMES:
        raise LayermoeError(f"unknown dtype {dtype!r}: use auto, float32 or bfloat16")
    return torch_dtype(DTYPE_NAMES[dtype])


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[DTYPE_NAMES[name]]


def dtype_name(dtype) -> str:
    """float32 | bfloat16, as manifests and cache keys name a torch dtype."""
    return str(dtype).removeprefix("torch.")


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
            _note_once(f"the base model is not at {spec} (stored relative to the work dir as {base.path}); "
                       f"using the absolute path {base.absolute_path} recorded with it")
            spec = base.absolute_path  # the work dir moved but the model did not
        else:
            raise LayermoeError(
                f"the base model is not at {spec} (stored relative to the work dir as {base.path}): "
                "copy it there, next to the moved work dir"
            )
    return resolve_model_spec(spec, revision=base.revision)


def load_base(workdir: Workdir, manifest: Manifest, device: str = "cpu", dtype=None):
    """Load the base model recorded in the manifest, its weights checked against the sha256 recorded
    when the work dir was made."""
    import torch

    from layermoe_cli.integrity import check_sha256
    from layermoe_cli.models import load_model

    base = manifest.base_model
    source = base_source(workdir, manifest)
    if source.kind == "gguf":
        files = {source.gguf_file: source.gguf_path}
    elif source.kind == "local":
        files = {p.name: p for p in source.path.iterdir()}
    else:
        files = {}  # a hub snapshot: its files are the hub's business (nothing recorded)
    if files:
        check_sha256(files, base.sha256, base.tensor_sha256, shown="the base model's",
                     fix="restore the weights this work dir was made from")
    return load_model(source, device=device, dtype=dtype or torch.float32, cache_dir=workdir.cache_dir / "models")


def load_generation_model(workdir: Workdir, manifest: Manifest, generation: Generation, device: str, dtype=None):
    """The model a step of `generation` reads: the base model for G1, the previous generation's for later ones."""
    if generation.index <= 1:
        return load_base(workdir, manifest, device=device, dtype=dtype)
    previous = manifest.generations[generation.index - 1]
    checkpoint = latest_checkpoint(previous)
    if checkpoint is None:
        raise LayermoeError(f"G{previous.index} has no model yet: run `layermoe expand` (and train) for it first")
    return load_recorded_checkpoint(workdir, manifest, checkpoint, device=device, dtype=dtype)


# What rebuilds the model a step wrote (said when it no longer matches its checksums).
_REBUILD = {"expansion": "run `layermoe expand --force` to rebuild it",
            "stage1": "run `layermoe train --stage 1 --force` to rebuild it",
            "stage2": "run `layermoe train --stage 2 --force` to rebuild it"}


def _writer_of(manifest: Manifest, checkpoint: str):
    """(generation, step name, record) of the step that wrote `checkpoint` (relative to the work dir), or None."""
    for generation in manifest.generations:
        for name in MODEL_STEPS:
            record = generation.step(name)
            if getattr(record, "checkpoint", None) == checkpoint:
                return generation, name, record
    return None


def verify_checkpoint(workdir: Workdir, manifest: Manifest, checkpoint: str) -> None:
    """Refuse (one line naming the file and tensor) a model folder of the work dir that is not what its step wrote.

    A truncated file is refused even with --no-verify (a loader would fail on it with a traceback).
    A folder no step of the manifest wrote (e.g. `eval --model PATH`) is not checked.
    """
    from layermoe_cli.integrity import check_files
    from layermoe_cli.models import check_readable_weights

    found = _writer_of(manifest, checkpoint)
    if found is None:
        return
    generation, name, record = found
    label = f"{'stage ' + name[-1] if name.startswith('stage') else name} of G{generation.index}"
    directory = workdir.resolve(checkpoint)
    if not directory.is_dir():
        raise LayermoeError(f"{checkpoint} (written by {label}) is missing: {_REBUILD[name]}")
    try:
        check_readable_weights(directory, fix=_REBUILD[name])
    except LayermoeError as e:  # name the file as stored, relative to the work dir
        raise LayermoeError(str(e).replace(str(directory), checkpoint, 1)) from None
    check_files(directory, {k: v.model_dump() for k, v in record.checkpoint_files.items()}, shown=checkpoint,
                written_by=label, fix=_REBUILD[name])


def load_recorded_checkpoint(workdir: Workdir, manifest: Manifest, checkpoint: str, device: str = "cpu", dtype=None):
    """(model, tokenizer) of a model folder of the work dir, verified against what its step recorded."""
    verify_checkpoint(workdir, manifest, checkpoint)
    return load_checkpoint(workdir.resolve(checkpoint), device=device, dtype=dtype)


def record_checkpoint(workdir: Workdir, record, directory: Path) -> None:
    """Store in `record` what a step just wrote to `directory` (files, sha256, per-tensor digests)."""
    from layermoe_cli.integrity import file_checksums

    record.checkpoint = workdir.rel(directory)
    record.checkpoint_files = {name: FileChecksum(**entry) for name, entry in file_checksums(directory).items()}


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


_said: set[str] = set()  # fallback notes already printed by this process


def _note_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        err_console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True, highlight=False, emoji=False)


def resolve_data_spec(workdir: Workdir, source: DataSourceRecord, language: str | None = None) -> str:
    """The spec to read a recorded data source with.

    builtin and hf: sources as recorded. A file or folder: its path relative to the work dir
    (so a work dir copied together with its data keeps working), else the absolute path
    recorded beside it (a work dir moved without its data); which one is used is said once.
    """
    if source.kind in ("builtin", "hf"):
        return source.spec
    relative = workdir.resolve(source.spec)
    if relative.exists():
        return str(relative)
    what = f"data for {language!r}" if language else "a data source"
    if source.absolute_path and Path(source.absolute_path).exists():
        _note_once(f"{what}: {source.spec} is not there from {workdir.root}; using the absolute path "
                   f"{source.absolute_path} recorded with it")
        return source.absolute_path
    where = f"is not at {relative} (stored relative to the work dir as {source.spec})"
    if source.absolute_path:
        where = f"is neither at {relative} (stored relative to the work dir as {source.spec}) nor at {source.absolute_path}"
    raise LayermoeError(f"{what} {where}: put it back, or give it again with --data {language or 'LANG'}=PATH")


def texts_for(workdir: Workdir, generation: Generation, language: str, split: str, limit: int | None = None) -> list[str]:
    """Documents of one language from the data source recorded for it (train or held-out side), at most `limit`."""
    from layermoe_cli.data import load_texts

    source = generation.data[language]
    spec = resolve_data_spec(workdir, source, language)
    return load_texts(language, spec, split=split, limit=limit, cache_dir=workdir.cache_dir / "datasets",
                      text_field=source.text_field)
