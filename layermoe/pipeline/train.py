"""`layermoe train --stage 1|2`: the two training stages of the current generation.

A stage trains on the data of the step `prepare<stage>` (`layermoe prepare`), which runs first
when it has not, or when the data settings or sources changed.

Under `accelerate launch` every rank runs this; rank 0 alone holds the work dir's lock, writes
the manifest and prepares the data; the other ranks only read the manifest, and wait for the
prepared data by polling the file system (no collective call waits on the preparation).
"""

from __future__ import annotations

import os
from pathlib import Path

from layermoe.core.console import err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Generation, Manifest, StepStatus
from layermoe.core.workdir import StepAlreadyDone, Workdir, require_done, run_step, session
from layermoe.data import wait_for_prepared
from layermoe.modeling.base import folder_position_limit
from layermoe.pipeline.common import record_checkpoint, require_open, verify_checkpoint
from layermoe.pipeline.options import TrainOptions
from layermoe.pipeline.prepare import ensure_prepared, prepared_root, stage_key, stage_tokenizer, with_prepared_settings
from layermoe.training.checkpoint import verify_latest
from layermoe.training.config import load_train_config
from layermoe.training.distributed import (
    check_settings,
    check_shared_at_launch,
    check_tracker_stores,
    launched_world_size,
)
from layermoe.training.loop import train_stage


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_train(workdir: Workdir, options: TrainOptions) -> None:
    """`layermoe train`: the stage's settings are the recipe's (if any) with the flags over them."""
    stage, force, num_proc = options.stage, options.force, options.num_proc
    if stage not in (1, 2):
        raise LayermoeError(f"--stage {stage}: there are two training stages, 1 (new experts learn the new languages) "
                            "and 2 (routers learn to protect the old ones)")
    config = load_train_config(options.recipe, **options.settings, stage=stage)
    if num_proc is not None and num_proc < 1:
        raise LayermoeError("--num-proc must be at least 1")
    check_settings(config)  # a launch or tracker that cannot work here: before preparing anything
    check_shared_at_launch(workdir.root)  # several nodes: one work dir that all of them see, before any wait
    if _rank() != 0:
        manifest = workdir.load()
        generation = manifest.current
        require_open(generation)  # the line rank 0 stops with
        if generation.step(f"stage{stage}").status == StepStatus.done and not force:
            return
        _verify_source(workdir, manifest, generation, stage)
        check_tracker_stores(config, _run_dir(workdir, generation, stage))
        config = with_prepared_settings(generation, stage, config)
        key = stage_key(workdir, manifest, generation, config.data, stage_tokenizer(workdir, generation))
        prepared = wait_for_prepared(prepared_root(workdir) / key)  # rank 0 prepares it if needed
        _train(workdir, manifest, generation, stage, config, prepared.path)
        return
    with session(workdir):
        manifest = workdir.load()
        train_generation(workdir, manifest, manifest.current, stage, config, force=force, num_proc=num_proc)


def train_generation(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int, config, force=False,
                     num_proc=None) -> None:
    require_open(generation)
    if stage == 1:
        require_done(generation.expansion, f"expansion of G{generation.index}", "layermoe expand")
    else:
        require_done(generation.stage1, f"stage 1 of G{generation.index}", "layermoe train --stage 1")
    record = generation.step(f"stage{stage}")
    label = f"stage {stage} of G{generation.index}"
    if record.status == StepStatus.done and not force:
        raise StepAlreadyDone(f"{label} is done already (use --force to redo it)")
    _verify_source(workdir, manifest, generation, stage)  # before --force clears anything
    _check_seq_len(workdir, generation, stage, config)  # before the data is prepared
    check_tracker_stores(config, _run_dir(workdir, generation, stage))
    # the prepared data's settings; a global batch's accumulation for this launch (recorded as used)
    config = with_prepared_settings(generation, stage, config).for_world_size(launched_world_size())
    prepared_dir, fresh = ensure_prepared(workdir, manifest, generation, stage, config, num_proc=num_proc)

    if record.status == StepStatus.running and not (force or fresh):  # it will resume: check before saying so
        verify_latest(_run_dir(workdir, generation, stage) / "checkpoints")

    def stale(previous):
        err_console.print(f"stage {stage} of G{generation.index} was left running by pid {previous.pid} on {previous.host}: "
                          "resuming from its last checkpoint")

    with run_step(workdir, manifest, record, label, config.model_dump(mode="json"), force=force, on_stale=stale) as rec:
        if force or fresh:  # redo from scratch; otherwise a stale run resumes from its checkpoints
            _clear_checkpoints(workdir, generation, stage)
        result = _train(workdir, manifest, generation, stage, config, prepared_dir)
        record_checkpoint(workdir, rec, _output_dir(workdir, generation, stage))
        rec.steps, rec.tokens_seen = result.steps, result.tokens_seen
        rec.final_losses = dict(result.final_losses)
        rec.frozen_checksums = dict(result.frozen_checksums)
        run_dir = _run_dir(workdir, generation, stage)
        rec.outputs = {"checkpoint": rec.checkpoint, "log": workdir.rel(run_dir / "train_log.jsonl")}
        rec.metrics = {key: value for key, value in result.to_dict().items()
                       if key in ("trainable_groups", "trainable_parameters", "frozen_parameters", "resumed_from_step", "data",
                                  "trainable_checksum_by_rank", "distributed")}
        rec.metrics["data"]["prepared"] = workdir.rel(prepared_dir)


def _source(generation: Generation, stage: int) -> str:
    """The model a stage starts from: the expansion (stage 1) or stage 1's output (stage 2)."""
    return generation.expansion.checkpoint if stage == 1 else generation.stage1.checkpoint


def _verify_source(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int) -> None:
    verify_checkpoint(workdir, manifest, _source(generation, stage))


def _check_seq_len(workdir: Workdir, generation: Generation, stage: int, config) -> None:
    """Refuse a sequence longer than the positions of the model the stage trains."""
    source = _source(generation, stage)
    limit = folder_position_limit(workdir.resolve(source))
    if limit is None or config.seq_len <= limit:
        return
    given = "seq_len" in config.model_fields_set
    what = f"--seq-len {config.seq_len:,}" if given else f"the stage {stage} default sequence length {config.seq_len:,}"
    raise LayermoeError(f"{what} is more than the {limit:,} positions of {source} (its max_position_embeddings, RoPE "
                        f"scaling included): give --seq-len {limit:,} or less")


def _output_dir(workdir: Workdir, generation: Generation, stage: int) -> Path:
    return workdir.generation_dir(generation.index) / f"stage{stage}"


def _run_dir(workdir: Workdir, generation: Generation, stage: int) -> Path:
    return workdir.generation_dir(generation.index) / f"stage{stage}-run"


def _clear_checkpoints(workdir, generation, stage) -> None:
    import shutil

    shutil.rmtree(_run_dir(workdir, generation, stage) / "checkpoints", ignore_errors=True)


def _train(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int, config, prepared_dir: Path):

    source = _source(generation, stage)
    return train_stage(
        model_dir=workdir.resolve(source),
        output_dir=_output_dir(workdir, generation, stage),
        texts_by_language=None,
        generation_of_language=manifest.generation_of_language(),
        current_generation=generation.index,
        config=config,
        work_dir=_run_dir(workdir, generation, stage),
        prepared_dir=prepared_dir,
        show_progress=True,
    )
