"""`layermoe train --stage 1|2`: the two training stages of the current generation.

Under `accelerate launch` every rank runs this; rank 0 alone holds the work dir's lock and
writes the manifest, the other ranks only read it.
"""

from __future__ import annotations

import os
from pathlib import Path

from layermoe_cli.console import err_console
from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import Generation, Manifest, StepStatus
from layermoe_cli.pipeline.common import record_checkpoint, texts_for, verify_checkpoint
from layermoe_cli.workdir import Workdir, require_done, run_step, session


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_train(workdir: Workdir, *, stage: int, recipe=None, overrides=None, force=False) -> None:
    from layermoe_cli.training.config import load_train_config

    if stage not in (1, 2):
        raise LayermoeError(f"--stage {stage}: there are two training stages, 1 (new experts learn the new languages) "
                            "and 2 (routers learn to protect the old ones)")
    config = load_train_config(recipe, stage=stage, **(overrides or {}))
    if _rank() != 0:
        manifest = workdir.load()
        generation = manifest.current
        if generation.step(f"stage{stage}").status == StepStatus.done and not force:
            return
        _verify_source(workdir, manifest, generation, stage)
        _train(workdir, manifest, generation, stage, config)
        return
    with session(workdir):
        manifest = workdir.load()
        train_generation(workdir, manifest, manifest.current, stage, config, force=force)


def train_generation(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int, config, force=False) -> None:
    if stage == 1:
        require_done(generation.expansion, f"expansion of G{generation.index}", "layermoe expand")
    else:
        require_done(generation.stage1, f"stage 1 of G{generation.index}", "layermoe train --stage 1")
    record = generation.step(f"stage{stage}")
    if record.status != StepStatus.done or force:
        _verify_source(workdir, manifest, generation, stage)  # before --force clears anything

    def stale(previous):
        err_console.print(f"stage {stage} of G{generation.index} was left running by pid {previous.pid} on {previous.host}: "
                          "resuming from its last checkpoint")

    label = f"stage {stage} of G{generation.index}"
    with run_step(workdir, manifest, record, label, config.model_dump(mode="json"), force=force, on_stale=stale) as rec:
        if force:  # redo from scratch; without --force a stale run resumes from its checkpoints
            _clear_checkpoints(workdir, generation, stage)
        result = _train(workdir, manifest, generation, stage, config)
        record_checkpoint(workdir, rec, _output_dir(workdir, generation, stage))
        rec.steps, rec.tokens_seen = result.steps, result.tokens_seen
        rec.final_losses = dict(result.final_losses)
        rec.frozen_checksums = dict(result.frozen_checksums)
        run_dir = _run_dir(workdir, generation, stage)
        rec.outputs = {"checkpoint": rec.checkpoint, "log": workdir.rel(run_dir / "train_log.jsonl")}
        rec.metrics = {key: value for key, value in result.to_dict().items()
                       if key in ("trainable_groups", "trainable_parameters", "frozen_parameters", "resumed_from_step", "data")}


def _source(generation: Generation, stage: int) -> str:
    """The model a stage starts from: the expansion (stage 1) or stage 1's output (stage 2)."""
    return generation.expansion.checkpoint if stage == 1 else generation.stage1.checkpoint


def _verify_source(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int) -> None:
    verify_checkpoint(workdir, manifest, _source(generation, stage))


def _output_dir(workdir: Workdir, generation: Generation, stage: int) -> Path:
    return workdir.generation_dir(generation.index) / f"stage{stage}"


def _run_dir(workdir: Workdir, generation: Generation, stage: int) -> Path:
    return workdir.generation_dir(generation.index) / f"stage{stage}-run"


def _clear_checkpoints(workdir, generation, stage) -> None:
    import shutil

    shutil.rmtree(_run_dir(workdir, generation, stage) / "checkpoints", ignore_errors=True)


def _train(workdir: Workdir, manifest: Manifest, generation: Generation, stage: int, config):
    from layermoe_cli.training import train_stage

    source = _source(generation, stage)
    languages = generation.new_languages if stage == 1 else generation.languages
    texts = {lang: texts_for(workdir, generation, lang, "train") for lang in languages}
    empty = [lang for lang, docs in texts.items() if not docs]
    if empty:
        raise LayermoeError(f"no training documents for {', '.join(empty)}: check its --data")
    return train_stage(
        model_dir=workdir.resolve(source),
        output_dir=_output_dir(workdir, generation, stage),
        texts_by_language=texts,
        generation_of_language=manifest.generation_of_language(),
        current_generation=generation.index,
        config=config,
        work_dir=_run_dir(workdir, generation, stage),
        show_progress=True,
    )
