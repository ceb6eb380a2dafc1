"""What several pipeline steps share: which model a step works on, its checkpoints, and its data sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich.markup import escape

from layermoe.core.console import err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.integrity import check_files, check_readable_weights, check_sha256, file_checksums
from layermoe.core.manifest import MODEL_STEPS, DataSourceRecord, FileChecksum, Generation, Manifest, StepStatus
from layermoe.core.workdir import Workdir
from layermoe.data import load_documents, load_texts
from layermoe.modeling import load_layermoe
from layermoe.modeling.base import load_model, resolve_model_spec


def latest_checkpoint(generation: Generation) -> str | None:
    """The newest model of a generation: stage 2, else stage 1, else the expansion."""
    for record in (generation.stage2, generation.stage1):
        if record.status == StepStatus.done and record.checkpoint:
            return record.checkpoint
    if generation.expansion.status == StepStatus.done:
        return generation.expansion.checkpoint
    return None


def stopped_extension(generation: Generation) -> tuple[str, str] | None:
    """(step, error) when `extend` opened `generation` only in part: its profile done, then a step failed."""
    if generation.index < 2 or generation.expansion.status == StepStatus.done:
        return None
    for name, record in (("allocation", generation.allocation), ("expansion", generation.expansion)):
        if record.status == StepStatus.failed:
            return name, record.error or "no reason recorded"
    return None


def require_open(generation: Generation) -> None:
    """Refuse a step of a generation that `extend` did not finish opening, naming why (it would otherwise look
    like the previous generation, or like a missing `expand`)."""
    stopped = stopped_extension(generation)
    if stopped is not None:
        languages = ",".join(generation.new_languages)
        raise LayermoeError(f"G{generation.index} ({', '.join(generation.new_languages)}) did not open: "
                            f"`layermoe extend` stopped at its {stopped[0]} ({stopped[1]}): run "
                            f"`layermoe extend --new {languages}` again")


def base_source(workdir: Workdir, manifest: Manifest):
    """Where the base model recorded in the manifest is (paths are relative to the work dir): a ModelSource."""

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
                     fix="restore the files this work dir was made from")
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

    record.checkpoint = workdir.rel(directory)
    record.checkpoint_files = {name: FileChecksum(**entry) for name, entry in file_checksums(directory).items()}


def load_checkpoint(path: str | Path, device: str = "cpu", dtype=None):
    import torch
    from transformers import AutoTokenizer


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
    source = generation.data[language]
    spec = resolve_data_spec(workdir, source, language)
    return load_texts(language, spec, split=split, limit=limit, cache_dir=workdir.cache_dir / "datasets",
                      text_field=source.text_field)


def documents_of(workdir: Workdir, generation: Generation, language: str, split: str) -> Iterator[str]:
    """`texts_for` as a stream: a corpus is read only as far as the caller goes."""
    source = generation.data[language]
    spec = resolve_data_spec(workdir, source, language)
    return load_documents(language, spec, split, cache_dir=workdir.cache_dir / "datasets", text_field=source.text_field)
