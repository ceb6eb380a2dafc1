"""`layermoe prepare --stage 1|2`: a stage's training data, read, split, tokenised and packed once.

Recorded as the step `prepare1` / `prepare2` of the current generation. What it depends on:
the generation's data sources (recorded by `profile` or `extend`) and the tokenizer of the
expanded model (`expansion`); `stage1` trains on `prepare1`'s data and `stage2` on
`prepare2`'s. The data lives in `<workdir>/cache/prepared/<key>/`, where the key covers the
sources' identity (paths, sizes, modification times), the tokenizer and the settings: a change
to any of them means preparing again, and `train` does that by itself when needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.table import Table

from layermoe.core.console import console
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Generation, Manifest, StepStatus
from layermoe.core.numbers import human, human_bytes
from layermoe.core.workdir import StepAlreadyDone, Workdir, require_done, run_step, session
from layermoe.data import Source, is_prepared, prepare, prepared_key
from layermoe.data.selection import SELECTION_FIELDS
from layermoe.pipeline.common import require_open, resolve_data_spec
from layermoe.pipeline.options import PrepareOptions
from layermoe.training.config import TrainConfig, load_train_config


def run_prepare(workdir: Workdir, options: PrepareOptions) -> None:
    """`layermoe prepare`: the data selection is the recipe's (if any) with the flags over it."""
    config = load_train_config(options.recipe, stage=options.stage, data=options.data)
    if options.num_proc is not None and options.num_proc < 1:
        raise LayermoeError("--num-proc must be at least 1")
    with session(workdir):
        manifest = workdir.load()
        prepare_generation(workdir, manifest, manifest.current, options.stage, config.data, num_proc=options.num_proc,
                           force=options.force)


def prepared_root(workdir: Workdir) -> Path:
    return workdir.cache_dir / "prepared"


def stage_sources(workdir: Workdir, generation: Generation) -> dict:
    """The data source of every language of the generation, as recorded in the manifest."""

    sources = {}
    for language, record in generation.data.items():
        sources[language] = Source(language, resolve_data_spec(workdir, record, language), record.text_field)
    return sources


def stage_tokenizer(workdir: Workdir, generation: Generation):
    """The tokenizer training uses: the expanded model's (the base model's, unchanged)."""
    from transformers import AutoTokenizer

    require_open(generation)
    require_done(generation.expansion, f"expansion of G{generation.index}", "layermoe expand")
    return AutoTokenizer.from_pretrained(workdir.resolve(generation.expansion.checkpoint))


def stage_key(workdir: Workdir, manifest: Manifest, generation: Generation, selection, tokenizer) -> str:

    sources = stage_sources(workdir, generation)
    return prepared_key(sources, manifest.generation_of_language(), generation.index, selection, tokenizer)


def with_prepared_settings(generation: Generation, stage: int, config: TrainConfig) -> TrainConfig:
    """`config` with the data settings of the stage's last prepare, except those given explicitly.

    So `layermoe prepare --stage 1 --tokens-per-language N` then `layermoe train --stage 1` trains
    on what was prepared; `train --tokens-per-language M` prepares again with M.
    """
    prepared = (generation.step(f"prepare{stage}").config or {}).get("settings") or {}
    explicit = config.explicit_data_settings()
    update = {name: prepared[name] for name in SELECTION_FIELDS if name in prepared and name not in explicit}
    if not update:
        return config
    run = {"seed": update["seed"]} if "seed" in update else {}  # the run's seed follows the data's, as it set it
    return config.model_copy(update={**run, "data": config.data.model_copy(update=update)})


def prepare_generation(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int, selection, *,
                       num_proc: int | None = None, force: bool = False) -> Path:
    """Prepare a stage's data as the step `prepare<stage>`, unless it is prepared for these
    settings already (StepAlreadyDone); return the prepared directory."""

    tokenizer = stage_tokenizer(workdir, generation)
    sources = stage_sources(workdir, generation)
    gens = manifest.generation_of_language()
    key = stage_key(workdir, manifest, generation, selection, tokenizer)
    record = generation.step(f"prepare{stage}")
    path = prepared_root(workdir) / key
    label = f"stage {stage} data of G{generation.index}"
    if record.status == StepStatus.done and record.key == key and is_prepared(path) and not force:
        raise StepAlreadyDone(f"{label} is prepared already ({workdir.rel(path)}; use --force to prepare it again)")
    previous = record.data_dir
    config = {"settings": selection.model_dump(mode="json"), "key": key}
    with run_step(workdir, manifest, record, f"preparing {label}", config, force=True) as rec:
        if force and path.exists():
            shutil.rmtree(path)
        # (run_step marked every step built on this data pending: stage and eval, later generations)
        prepared = prepare(sources, gens, generation.index, selection, tokenizer, prepared_root(workdir), num_proc=num_proc)
        rec.key, rec.data_dir = key, workdir.rel(prepared.path)
        rec.documents_per_language = prepared.documents_per_language
        rec.tokens_per_language = prepared.tokens_per_language
        rec.outputs = {"data": rec.data_dir}
        size = sum(f.stat().st_size for f in prepared.path.iterdir())
        rec.metrics = {"num_documents": prepared.meta["num_documents"], "num_tokens": prepared.num_tokens,
                       "bytes": size, "dtype": prepared.meta["dtype"], "languages": prepared.meta["stats"],
                       "notes": prepared.meta["notes"]}
    if previous and previous != rec.data_dir:
        _drop_unused(workdir, manifest, previous)
    console.print(prepared_table(generation, stage, rec))
    return path


def _drop_unused(workdir: Workdir, manifest: Manifest, stored: str) -> None:
    """Delete a prepared directory no step of the manifest points at any more."""
    used = {g.step(name).data_dir for g in manifest.generations for name in ("prepare1", "prepare2")}
    path = workdir.resolve(stored)
    if stored not in used and path.parent == prepared_root(workdir).resolve() and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def ensure_prepared(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int, config, *,
                    num_proc: int | None = None) -> tuple[Path, bool]:
    """(the prepared directory `train` reads, whether it was prepared just now as the step prepare<stage>)."""

    try:
        return prepare_generation(workdir, manifest, generation, stage, config.data, num_proc=num_proc), True
    except StepAlreadyDone:
        return workdir.resolve(generation.step(f"prepare{stage}").data_dir), False


def prepared_table(generation: Generation, stage: int, record) -> Table:

    table = Table(title=f"stage {stage} data of G{generation.index}: {record.data_dir}", title_justify="left")
    for column in ("language", "generation", "documents", "tokens", "documents read", "source read"):
        table.add_column(column, justify="left" if column == "language" else "right")
    for stats in record.metrics.get("languages", []):
        read = "—"
        if stats.get("source_bytes"):
            read = f"{100 * min(stats['bytes_read'], stats['source_bytes']) / stats['source_bytes']:.0f}%"
        table.add_row(stats["language"], f"G{stats['generation']}", f"{stats['documents']:,}", f"{stats['tokens']:,}",
                      f"{stats['documents_read']:,}", read)
    metrics = record.metrics
    table.caption = (f"{human(metrics['num_tokens'])} tokens as {metrics['dtype']}, {human_bytes(metrics['bytes'])} "
                     f"({metrics['bytes'] / max(metrics['num_tokens'], 1):.2f} bytes per token)")
    return table
