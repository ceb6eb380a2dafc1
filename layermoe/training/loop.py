"""`train_stage`: one training stage of an expanded model, resumable, on any accelerate setup.

Stage 1 trains this generation's new experts and the routers on the new languages
(next-token + alpha x load balancing). Stage 2 trains routers and routing classifiers on
the new languages plus a replay of the old ones (next-token + beta x LPR + gamma x
classifier). See METHOD.md section 4.

A plain Hugging Face causal LM (not a layermoe checkpoint) trains as a dense full
fine-tune: stage 1 only, every weight trainable, next-token loss only, saved with
save_pretrained (the baseline of `layermoe demo --compare`).

Devices come from `accelerate`: a plain call runs on one device; `accelerate launch
--config_file recipes/accelerate/<name>.yaml -m layermoe.training.run_stage ...` runs
the same function under DDP, FSDP2 or DeepSpeed.

    train_stage = setup (setup.py: data, model, frozen weights) -> resume (checkpoint.py)
                  -> the steps (`_run_steps`, reporting.py) -> verify and save (saving.py)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from layermoe.core.console import err_console
from layermoe.core.errors import LayermoeError
from layermoe.data import PackedData, block_indices
from layermoe.training.checkpoint import ResumePoints
from layermoe.training.config import TrainConfig
from layermoe.training.distributed import (
    check_shared_work_dir,
    launched_world_size,
    make_accelerator,
    parameters_may_go_unused,
)
from layermoe.training.losses import classifier_over_layers, load_balancing_over_layers, lpr_over_layers
from layermoe.training.reporting import StageReporter, expert_slot_counts, load_fractions
from layermoe.training.saving import verify_and_save
from layermoe.training.setup import (
    DENSE_GROUPS,
    StageData,
    StageModel,
    broadcast_from_main,
    freeze_for_stage,
    is_layermoe_checkpoint,
    load_stage_data,
    load_stage_model,
    make_scheduler,
    plan_steps,
    trainable_groups,
)

__all__ = ["TrainResult", "freeze_for_stage", "stage_loss", "train_stage", "trainable_groups"]


@dataclass
class TrainResult:
    stage: int
    current_generation: int
    steps: int
    tokens_seen: int  # real (non-padding) tokens over all processes
    final_losses: dict[str, float]  # the last logged step, averaged over processes
    trainable_groups: list[str]
    trainable_parameters: int
    frozen_parameters: int
    frozen_checksums: dict[str, str]  # name -> sha256 of the bytes, verified unchanged after training
    trainable_checksum_by_rank: list[str]  # sha256 over all trainable tensors, one per process
    resumed_from_step: int | None
    output_dir: str
    data: dict = field(default_factory=dict)  # documents / tokens per language, blocks, seq_len
    distributed: dict = field(default_factory=dict)  # type, processes, parameters held as sharded DTensors

    def to_dict(self) -> dict:
        return asdict(self)


def stage_loss(
    outputs,
    batch: Mapping[str, torch.Tensor],
    stage: int,
    current_generation: int,
    config: TrainConfig,
    expert_generation: Mapping[int, torch.Tensor],
    top_k: int,
):
    """Total loss of a micro-batch and its detached parts (for logging).

    Stage 1: ntp + alpha x balance. Stage 2: ntp + beta x LPR + gamma x classifier.
    """
    ntp = outputs.loss
    token_mask = batch["attention_mask"].reshape(-1).bool()  # [T]
    token_generation = batch["generation"].reshape(-1)  # [T], -100 on padding
    parts = {"ntp": ntp}
    if stage == 1:
        balance = load_balancing_over_layers(outputs.router_logits, token_mask, top_k, config.balance_form)
        parts["balance"] = balance
        total = ntp + config.alpha * balance
    else:
        lpr = lpr_over_layers(outputs.router_logits, token_generation, expert_generation, current_generation,
                              config.lpr_form, config.lpr_tokens)
        cls = classifier_over_layers(outputs.classifier_logits or {}, token_generation)
        parts["lpr"], parts["classifier"] = lpr, cls
        total = ntp + config.beta * lpr + config.gamma * cls
    parts["loss"] = total
    return total, {k: v.detach().float() for k, v in parts.items()}


# ---------------------------------------------------------------- the steps


@dataclass
class _Run:
    """The live objects of one stage's steps."""

    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate (DDP / FSDP wrapper)
    optimizer: object
    scheduler: object
    data: PackedData
    stage: StageModel
    config: TrainConfig
    current_generation: int
    blocks_per_step: int
    total_steps: int


class _LogWindow:
    """Loss parts, router top-k slots and tokens summed since the last log line."""

    def __init__(self):
        self.started, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.sums: dict[str, torch.Tensor] = {}
        self.slots: dict[int, torch.Tensor] = {}

    def add_step(self, sums: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def record(self, run: _Run, step: int, tokens_seen: int, session_start: float, session_steps: int,
               grad_norm) -> dict:
        """The log line: means over the window's steps and over processes."""
        names = sorted(self.sums)
        stacked = run.accelerator.reduce(torch.stack([self.sums[k] / self.steps for k in names]), reduction="mean")
        now = time.perf_counter()
        elapsed = now - session_start
        record = {k: float(v) for k, v in zip(names, stacked.tolist())}
        record.update(
            step=step,
            total_steps=run.total_steps,
            lr=run.scheduler.get_last_lr()[0],
            tokens_seen=tokens_seen,
            tokens_per_s=self.tokens / max(now - self.started, 1e-9),
            elapsed_s=elapsed,
            eta_s=elapsed / session_steps * (run.total_steps - step),
        )
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.slots:
            record["expert_load"] = load_fractions(run.accelerator, self.slots)
        return record


def _micro_step(run: _Run, batch: dict, window: _LogWindow, trainable_params: list) -> tuple[dict, tuple]:
    """Forward, backward and (on the last micro-step of an accumulation) the optimizer step.

    Returns the detached loss parts and, when the gradients synced, (True, their norm); else (False, None)."""
    accelerator, stage, config = run.accelerator, run.stage, run.config
    grad_norm = (False, None)
    with accelerator.accumulate(run.model):
        outputs = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                            **({} if stage.dense else {"output_router_logits": True}))
        if stage.dense:
            loss, parts = outputs.loss, {"ntp": outputs.loss.detach().float(), "loss": outputs.loss.detach().float()}
        else:
            loss, parts = stage_loss(outputs, batch, config.stage, run.current_generation, config,
                                     stage.expert_generation, stage.top_k)
            token_mask = batch["attention_mask"].reshape(-1).bool()
            for layer, counts in expert_slot_counts(outputs.router_logits, token_mask, stage.top_k).items():
                window.slots[layer] = window.slots.get(layer, 0) + counts.detach()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            # clip_grad_norm_ returns the total norm: with clipping off, measure it anyway (inf max)
            norm = accelerator.clip_grad_norm_(trainable_params, config.max_grad_norm or float("inf"))
            grad_norm = (True, None if norm is None else norm.detach().float())
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return parts, grad_norm


def _run_steps(run: _Run, start_step: int, tokens_seen: int, reporter: StageReporter, resume: ResumePoints,
               on_step: Callable[[dict], None] | None) -> tuple[int, dict[str, float]]:
    """Steps start_step+1 .. total_steps; returns (tokens seen, the last logged loss parts)."""
    accelerator, config, data = run.accelerator, run.config, run.data
    world, rank, micro = accelerator.num_processes, accelerator.process_index, config.micro_batch_size
    trainable_params = [p for p in run.model.parameters() if p.requires_grad]
    final_losses: dict[str, float] = {}
    window = _LogWindow()
    grad_norm = None
    session_start, session_steps = time.perf_counter(), 0
    for step in range(start_step + 1, run.total_steps + 1):
        position = (step - 1) * run.blocks_per_step
        sums: dict[str, torch.Tensor] = {}
        for m in range(config.grad_accum_steps):
            first = position + m * micro * world  # this micro-step's global batch ...
            global_idx = block_indices(first, micro * world, len(data), config.seed)
            local_idx = global_idx[rank * micro : (rank + 1) * micro]  # ... and this rank's slice
            step_tokens = int(data.real_tokens(global_idx).sum())
            tokens_seen += step_tokens
            window.tokens += step_tokens
            batch = {k: v.to(accelerator.device) for k, v in data.batch(local_idx).items()}
            parts, (synced, norm) = _micro_step(run, batch, window, trainable_params)
            grad_norm = norm if synced else grad_norm
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / config.grad_accum_steps
        if not accelerator.optimizer_step_was_skipped:
            run.scheduler.step()
        session_steps += 1
        window.add_step(sums)
        record = None
        if step % config.log_every == 0 or step == run.total_steps:
            record = window.record(run, step, tokens_seen, session_start, session_steps, grad_norm)
            final_losses = {k: record[k] for k in sorted(sums)}
            window = _LogWindow()
        reporter.step(step, record)
        if on_step is not None and accelerator.is_main_process:
            on_step({"step": step, "total_steps": run.total_steps, "tokens_seen": tokens_seen,
                     **{k: float(v) for k, v in sums.items()}})
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < run.total_steps:
            resume.save(step, tokens_seen)
    return tokens_seen, final_losses


# ---------------------------------------------------------------- the stage


def train_stage(
    model_dir: Path,
    output_dir: Path,
    texts_by_language: Mapping[str, Sequence[str]] | None,
    generation_of_language: Mapping[str, int],
    current_generation: int,
    config: TrainConfig,
    work_dir: Path,
    *,
    prepared_dir: Path | None = None,
    log_path: Path | None = None,
    on_step: Callable[[dict], None] | None = None,
    show_progress: bool = False,
    accelerator=None,
) -> TrainResult:
    """Train one stage and save the model to output_dir (same format as the expand step).

    model_dir: the expanded checkpoint (stage 1) or the stage-1 output (stage 2); a plain HF
    causal LM here means a dense full fine-tune (stage 1 only, all weights, next-token loss).
    prepared_dir: the stage's data from `layermoe.data.prepare` (`layermoe prepare`); or
    texts_by_language: training-side documents per language (held-out data already removed),
    prepared here into `work_dir/cache/prepared/` first (by the first process of each machine;
    the others wait for it on disk).
    work_dir: holds `checkpoints/`, `cache/` and, by default, `train_log.jsonl`.
    Calling again with the same arguments after a crash resumes from the last complete
    checkpoint. on_step(record) runs on the main process after every optimizer step.
    """
    model_dir, output_dir, work_dir = Path(model_dir), Path(output_dir), Path(work_dir)
    if current_generation < 1:
        raise LayermoeError(f"current_generation={current_generation}; the first expansion is generation 1")
    log_path = Path(log_path) if log_path is not None else work_dir / "train_log.jsonl"

    # ---- setup: data (before any process group exists), devices, model, length
    config = config.for_world_size(launched_world_size())  # a global batch in sequences: its accumulation
    data = load_stage_data(model_dir, config, current_generation, work_dir, generation_of_language, prepared_dir,
                           texts_by_language, show_progress)
    dense = not is_layermoe_checkpoint(model_dir)
    accelerator = accelerator or make_accelerator(
        config, run_dir=work_dir, find_unused_parameters=parameters_may_go_unused(config.stage, dense))
    check_shared_work_dir(accelerator, work_dir)  # several nodes: one work dir that all of them see
    main = accelerator.is_main_process
    set_seed(config.seed)
    stage = load_stage_model(model_dir, config, current_generation)
    frozen_digest = broadcast_from_main(
        accelerator, hashlib.sha256(json.dumps(stage.frozen_sums, sort_keys=True).encode()).hexdigest() if main else None)
    world = accelerator.num_processes
    blocks_per_step = config.micro_batch_size * config.grad_accum_steps * world
    total_steps = plan_steps(config, len(data.blocks), blocks_per_step)
    planned_tokens = total_steps * blocks_per_step * config.seq_len
    if main and show_progress:
        err_console.print(f"global batch: {blocks_per_step:,} sequences of {config.seq_len:,} tokens per step = "
                          f"{config.micro_batch_size} per process x {config.grad_accum_steps} accumulation x {world} "
                          f"process{'es' if world > 1 else ''}", highlight=False, soft_wrap=True)
    if main and show_progress and 2 * planned_tokens < data.blocks.num_tokens:
        err_console.print(f"[yellow]note:[/] {total_steps:,} steps train on at most {planned_tokens:,} of the "
                          f"{data.blocks.num_tokens:,} prepared tokens: a budget (--tokens-per-language) prepares less",
                          soft_wrap=True, highlight=False)
    params = dict(stage.model.named_parameters())
    # rows of a partly frozen embedding: no weight decay (it would move the frozen rows too)
    partial = set(stage.frozen_rows or {})
    groups = [{"params": [params[n] for n in stage.trainable_names if n not in partial]},
              {"params": [params[n] for n in stage.trainable_names if n in partial], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                                  betas=tuple(config.adam_betas), weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(stage.model, optimizer)
    distributed = {"type": accelerator.distributed_type.value, "processes": world,
                   "sharded_parameters": sum(type(p).__name__ == "DTensor" for p in model.parameters())}

    # ---- resume
    # what a resumed run must share with the one that saved: settings, data, frozen weights, processes
    fingerprint = {"config": config.trainable_fingerprint, "current_generation": current_generation, "world_size": world,
                   "frozen": frozen_digest, "data": [data.blocks.documents_per_language, data.blocks.tokens_per_language,
                                                     len(data.blocks), data.prepared.meta["key"]]}
    resume = ResumePoints(work_dir / "checkpoints", accelerator, accelerator.unwrap_model(model), optimizer, scheduler,
                          stage.trainable_names, fingerprint, config.keep_checkpoints, blocks_per_step)
    start_step, tokens_seen, resumed_from = resume.resume()

    # ---- train
    run = _Run(accelerator, model, optimizer, scheduler, data.blocks, stage, config, current_generation,
               blocks_per_step, total_steps)
    reporter = StageReporter(log_path, total_steps, start_step, show_progress, accelerator,
                             {**config.model_dump(mode="json"), "current_generation": current_generation,
                              "world_size": world}, f"g{current_generation}-stage{config.stage}")
    try:
        tokens_seen, final_losses = _run_steps(run, start_step, tokens_seen, reporter, resume, on_step)
    finally:
        reporter.close()

    # ---- verify the frozen weights, save
    checksum_by_rank = verify_and_save(accelerator, model, stage, model_dir, output_dir, data.tokenizer, config.stage,
                                       config.gradient_checkpointing)
    return TrainResult(
        stage=config.stage,
        current_generation=current_generation,
        steps=total_steps,
        tokens_seen=tokens_seen,
        final_losses=final_losses,
        trainable_groups=list(DENSE_GROUPS) if stage.dense else trainable_groups(config.stage, current_generation),
        trainable_parameters=sum(params[n].numel() for n in stage.trainable_names),
        frozen_parameters=sum(params[n].numel() for n in stage.frozen_names),
        frozen_checksums=stage.frozen_sums,
        trainable_checksum_by_rank=checksum_by_rank,
        resumed_from_step=resumed_from,
        output_dir=str(output_dir),
        distributed=distributed,
        data=_data_summary(data, config.seq_len, blocks_per_step),
    )


def _data_summary(data: StageData, seq_len: int, blocks_per_step: int) -> dict:
    """What a stage trained on, for its result and the manifest."""
    blocks = data.blocks
    return {"languages": blocks.languages, "documents_per_language": blocks.documents_per_language,
            "tokens_per_language": blocks.tokens_per_language, "blocks": len(blocks), "seq_len": seq_len,
            "blocks_per_step": blocks_per_step, "global_batch_sequences": blocks_per_step,
            "prepared": str(data.prepared.path), "key": data.prepared.meta["key"]}
