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
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from layermoe.core.errors import LayermoeError
from layermoe.data import PackedData, Source, block_indices, open_prepared, prepare_or_wait
from layermoe.training import checkpoint as ckpt
from layermoe.training.config import TrainConfig
from layermoe.training.distributed import is_sharded, make_accelerator
from layermoe.training.losses import classifier_over_layers, load_balancing_over_layers, lpr_over_layers


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


# ---------------------------------------------------------------- what trains


DENSE_GROUPS = ["all"]  # what a dense full fine-tune trains


def is_layermoe_checkpoint(model_dir: Path) -> bool:
    """True for a checkpoint written by the expand step, False for a plain HF causal LM."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type") == "layermoe"
    except (OSError, ValueError):
        raise LayermoeError(f"{model_dir} has no readable config.json; give a checkpoint directory") from None


def _load_dense(model_dir: Path):
    from transformers import AutoModelForCausalLM

    from layermoe.compat import model_loading_options

    return AutoModelForCausalLM.from_pretrained(model_dir, **model_loading_options())


def trainable_groups(stage: int, current_generation: int) -> list[str]:
    """Parameter groups (keys of `modeling.parameter_groups`) trained in a stage."""
    if stage == 1:
        return [f"experts_g{current_generation}", "router"]
    return ["router", "classifier"]


def freeze_for_stage(model, stage: int, current_generation: int) -> list[str]:
    """Set requires_grad for the stage; return the trainable parameter names (model order)."""
    from layermoe.modeling import parameter_groups

    groups = parameter_groups(model)
    wanted = trainable_groups(stage, current_generation)
    if stage == 1 and not groups.get(f"experts_g{current_generation}"):
        raise LayermoeError(
            f"the model has no generation-{current_generation} experts to train; expand it for generation {current_generation} first"
        )
    names = {n for g in wanted for n in groups.get(g, [])}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            trainable.append(name)
    return trainable


# ---------------------------------------------------------------- loss


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
        balance = load_balancing_over_layers(outputs.router_logits, token_mask, top_k)
        parts["balance"] = balance
        total = ntp + config.alpha * balance
    else:
        lpr = lpr_over_layers(outputs.router_logits, token_generation, expert_generation, current_generation)
        cls = classifier_over_layers(outputs.classifier_logits or {}, token_generation)
        parts["lpr"], parts["classifier"] = lpr, cls
        total = ntp + config.beta * lpr + config.gamma * cls
    parts["loss"] = total
    return total, {k: v.detach().float() for k, v in parts.items()}


# ---------------------------------------------------------------- setup helpers


def plan_steps(config: TrainConfig, num_blocks: int, blocks_per_step: int) -> int:
    """Optimizer steps: max_steps, else token_budget / tokens per step, else epochs over the blocks."""
    if config.max_steps is not None:
        return config.max_steps
    if config.token_budget is not None:
        return max(1, math.ceil(config.token_budget / (blocks_per_step * config.seq_len)))
    return max(1, math.ceil(config.epochs * num_blocks / blocks_per_step))


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or int(round(config.warmup_ratio * total_steps))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _trainable_digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(ckpt.tensor_sha256(t).encode())
    return h.hexdigest()


def _broadcast_from_main(accelerator, value):
    """The main process's `value` on every process (one small collective; none when alone)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _load_fractions(accelerator, slots: dict[int, torch.Tensor]) -> dict[str, list[float]]:
    """Router top-k slot counts per layer, summed over processes, as fractions per expert."""
    layers = sorted(slots)
    flat = accelerator.reduce(torch.cat([slots[i].float() for i in layers]), reduction="sum")  # one collective
    out, start = {}, 0
    for layer in layers:
        counts = flat[start : start + slots[layer].numel()]
        start += slots[layer].numel()
        out[str(layer)] = [round(float(x), 6) for x in counts / counts.sum().clamp_min(1)]
    return out


def _checkpoint_tensors(model_dir: Path) -> Callable[[str], torch.Tensor]:
    """name -> tensor, read lazily from a checkpoint's safetensors files (the frozen originals)."""
    from safetensors import safe_open

    where = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({name: path for name in f.keys()})

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    return read


def _model_from_state_dict(model_dir: Path, dense: bool, state: dict, dtype, frozen: set[str], reference):
    """The trained model for saving, built on the meta device around the gathered state dict.

    No second full copy: the tensors are assigned, not copied. Frozen tensors are taken from
    the source checkpoint (verified equal), so an engine that held them in bf16 (DeepSpeed)
    cannot round them in the saved model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from layermoe.modeling import LayermoeConfig, LayermoeForCausalLM

    with torch.device("meta"):
        if dense:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        else:
            model = LayermoeForCausalLM(LayermoeConfig.from_pretrained(model_dir))
    tensors = {name: (reference(name) if name in frozen else value).to(dtype) for name, value in state.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"the gathered state dict lacks {', '.join(left[:3])}: this is a bug")
    return model


# ---------------------------------------------------------------- logging


class _Reporter:
    """JSONL log + the accelerate trackers (`--report-to`) + progress, on the main process only.

    Progress: a Rich bar on a terminal; otherwise (SLURM, CI, a log file) a plain line every
    ~30 s and at the last step, since Rich would print its bar only once, at the end."""

    def __init__(self, log_path: Path, total_steps: int, start_step: int, show_progress: bool, accelerator,
                 run_config: dict, run_name: str):
        from layermoe.core.console import err_console
        from layermoe.core.progress import Throttle

        self.enabled = accelerator.is_main_process
        self.accelerator = accelerator
        self.file = None
        self.progress = None
        self.throttle = None
        self.total_steps, self.last = total_steps, None
        self.console = err_console
        self.trackers = bool(accelerator.log_with)
        if self.trackers:  # collective-free: only the main process holds trackers
            accelerator.init_trackers("layermoe", config=_scalars(run_config), init_kwargs={
                "wandb": {"name": run_name, "dir": accelerator.logging_dir}, "mlflow": {"run_name": run_name}})
        if not self.enabled:
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(log_path, "a", encoding="utf-8")
        if show_progress and not err_console.is_terminal:
            self.throttle = Throttle()
        elif show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("stage training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeRemainingColumn(), console=err_console,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)

    def step(self, step: int, record: dict | None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            desc = ""
            if record:
                desc = f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=step, **({"description": desc} if desc else {}))
        self.last = record or self.last
        if self.throttle is not None and (self.throttle.due() or step == self.total_steps):
            line = f"stage training: step {step:,}/{self.total_steps:,}"
            if self.last:
                line += (f", loss {self.last['loss']:.4f} (step {self.last['step']:,}), "
                         f"{self.last['tokens_per_s']:,.0f} tok/s, {self.last['elapsed_s']:,.0f} s elapsed, "
                         f"about {self.last['eta_s']:,.0f} s to go")
            self.console.print(line, highlight=False, soft_wrap=True)
        if record is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers:
            self.accelerator.log(_scalars(record, skip=("step",), prefix="train/"), step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.trackers and self.enabled:  # not end_training(): that also destroys the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()


def _scalars(values: dict, skip=(), prefix: str = "") -> dict:
    """Flatten nested dicts/lists of numbers into `a/b/0`-named scalars (what trackers take)."""
    out = {}
    for key, value in values.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, prefix=f"{name}/"))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def expert_slot_counts(router_logits: Mapping[int, torch.Tensor], token_mask: torch.Tensor, top_k: int) -> dict[int, torch.Tensor]:
    """Per MoE layer, how many of the router's top-k slots each expert got ([E_i] counts), padding excluded."""
    counts = {}
    for layer, logits in router_logits.items():  # logits: [T, E_i]
        chosen = logits[token_mask].topk(min(top_k, logits.shape[-1]), dim=-1).indices  # [n, k]
        counts[layer] = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1])
    return counts


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
    from accelerate.utils import gather_object, set_seed
    from transformers import AutoTokenizer

    from layermoe.modeling import load_layermoe, save_layermoe

    model_dir, output_dir, work_dir = Path(model_dir), Path(output_dir), Path(work_dir)
    if current_generation < 1:
        raise LayermoeError(f"current_generation={current_generation}; the first expansion is generation 1")
    ckpt_root = work_dir / "checkpoints"
    log_path = Path(log_path) if log_path is not None else work_dir / "train_log.jsonl"

    # ---- data: prepared before any process group exists, so no collective call waits on it;
    # every rank then only memory-maps it.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if prepared_dir is not None:
        prepared = open_prepared(prepared_dir)
    elif texts_by_language is not None:
        sources = {lang: Source(lang, texts=texts) for lang, texts in texts_by_language.items()}
        prepared = prepare_or_wait(sources, generation_of_language, current_generation, config.data, tokenizer,
                                   work_dir / "cache" / "prepared", show_progress=show_progress)
    else:
        raise LayermoeError("train_stage needs prepared_dir or texts_by_language")
    if prepared.meta["stage"] != config.stage or prepared.meta["current_generation"] != current_generation:
        raise LayermoeError(f"{prepared.path} holds stage {prepared.meta['stage']} data of generation "
                            f"{prepared.meta['current_generation']}, not stage {config.stage} of generation {current_generation}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = PackedData(prepared, config.seq_len, pad_id)

    accelerator = accelerator or make_accelerator(config, run_dir=work_dir)
    main = accelerator.is_main_process
    set_seed(config.seed)

    # ---- model, freezing, checksums
    dense = not is_layermoe_checkpoint(model_dir)
    if dense and config.stage != 1:
        raise LayermoeError(f"{model_dir} is a dense model: it has no router, so only stage 1 (a full fine-tune) applies")
    # Under FSDP with cpu_ram_efficient_loading, transformers loads the weights on the first
    # process only; the others build the model on the meta device and get their shards later.
    model = _load_dense(model_dir) if dense else load_layermoe(model_dir)
    if not dense and current_generation > model.config.num_generations:
        raise LayermoeError(
            f"the model in {model_dir} has {model.config.num_generations} generation(s) of experts, not {current_generation}; expand it first"
        )
    if not dense and not model.config.moe_layers:
        raise LayermoeError(f"the model in {model_dir} has no MoE layer; nothing to train")
    storage_dtype = next(iter(model.parameters())).dtype
    # Weights live in fp32 (exact for bf16/fp16 checkpoints); bf16/fp16 is autocast compute,
    # so the optimizer never rounds a 5e-5 update away. Cast back to storage dtype on save.
    model.float()
    if dense:
        model.requires_grad_(True)
        trainable_names = [name for name, _ in model.named_parameters()]
    else:
        trainable_names = freeze_for_stage(model, config.stage, current_generation)
    params = dict(model.named_parameters())
    if not dense:
        # The classifier is trained in stage 2 only. Stage 1 trains and saves with the router alone
        # deciding (an untrained classifier would send random new-language tokens to expert 0);
        # stage 2 turns classifier routing on, and its output keeps it on.
        model.set_classifier_routing(config.stage == 2)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    frozen_names = [n for n in params if n not in set(trainable_names)]
    on_meta = any(params[n].is_meta for n in frozen_names)
    frozen_sums = {} if on_meta else ckpt.frozen_checksums((n, params[n]) for n in frozen_names)
    frozen_digest = _broadcast_from_main(
        accelerator, hashlib.sha256(json.dumps(frozen_sums, sort_keys=True).encode()).hexdigest() if main else None)
    if not dense:
        expert_generation = {i: torch.tensor(model.expert_generation_ids(i)) for i in model.config.moe_layers}
        top_k = next(iter(model.moe_blocks().values())).top_k  # the routers' k, as the model routes

    world, rank = accelerator.num_processes, accelerator.process_index
    micro = config.micro_batch_size
    blocks_per_step = micro * config.grad_accum_steps * world
    total_steps = plan_steps(config, len(data), blocks_per_step)
    planned_tokens = total_steps * blocks_per_step * config.seq_len
    if main and show_progress and 2 * planned_tokens < data.num_tokens:
        from layermoe.core.console import err_console

        err_console.print(f"[yellow]note:[/] {total_steps:,} steps train on at most {planned_tokens:,} of the "
                          f"{data.num_tokens:,} prepared tokens: a budget (--tokens-per-language) prepares less",
                          soft_wrap=True, highlight=False)

    # ---- optimizer, scheduler, devices
    optimizer = torch.optim.AdamW(
        [params[n] for n in trainable_names],
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
        weight_decay=config.weight_decay,
    )
    scheduler = make_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    distributed = {"type": accelerator.distributed_type.value, "processes": world,
                   "sharded_parameters": sum(type(p).__name__ == "DTensor" for p in model.parameters())}

    # ---- resume
    start_step, tokens_seen, resumed_from = 0, 0, None
    fingerprint = {
        "config": config.trainable_fingerprint,
        "current_generation": current_generation,
        "world_size": world,
        "frozen": frozen_digest,
        "data": [data.documents_per_language, data.tokens_per_language, len(data), prepared.meta["key"]],
    }
    last = ckpt.latest_checkpoint(ckpt_root)
    if last is not None:
        state = ckpt.read_json(last / "state.json")
        if state["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise LayermoeError(
                f"{ckpt_root} holds checkpoints of a different run (model, data, settings or process count differ); "
                "use a fresh work dir or delete that folder"
            )
        ckpt.verify_checkpoint_files(last, state)
        if is_sharded(accelerator):
            accelerator.load_state(str(last / "accelerate"))
        else:
            from safetensors.torch import load_file

            saved = load_file(str(last / "trainable.safetensors"))
            live = dict(unwrapped.named_parameters())
            with torch.no_grad():
                for name in trainable_names:
                    live[name].copy_(saved[name])
            optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=False))
        ckpt.set_rng_state(torch.load(last / f"rng-rank{rank}.pt", weights_only=False))
        start_step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], state["step"]

    def save_checkpoint(step: int) -> None:
        if main:
            ckpt.prepare_staging(ckpt_root, step)
        accelerator.wait_for_everyone()
        stage_dir = ckpt.staging_dir(ckpt_root, step)
        if is_sharded(accelerator):
            accelerator.save_state(str(stage_dir / "accelerate"))
        elif main:
            from safetensors.torch import save_file

            live = dict(unwrapped.named_parameters())
            save_file({n: live[n].detach().cpu().contiguous() for n in trainable_names}, str(stage_dir / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), stage_dir / "optimizer.pt")
        torch.save(ckpt.rng_state(), stage_dir / f"rng-rank{rank}.pt")
        if main:
            torch.save(scheduler.state_dict(), stage_dir / "scheduler.pt")
        accelerator.wait_for_everyone()
        if main:  # every rank's files are written: record them, verified when a run resumes from here
            ckpt.write_json(
                stage_dir / "state.json",
                {"step": step, "position": step * blocks_per_step, "tokens_seen": tokens_seen, "fingerprint": fingerprint,
                 "files": ckpt.checkpoint_files(stage_dir)},
            )
            ckpt.publish(ckpt_root, step, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    # ---- train
    run_name = f"g{current_generation}-stage{config.stage}"
    reporter = _Reporter(log_path, total_steps, start_step, show_progress, accelerator,
                         {**config.model_dump(mode="json"), "current_generation": current_generation, "world_size": world},
                         run_name)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    final_losses: dict[str, float] = {}
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    window_sums: dict[str, torch.Tensor] = {}  # loss parts summed since the last log line
    window_slots: dict[int, torch.Tensor] = {}  # router top-k slots per expert since the last log line
    grad_norm = None
    session_start, session_steps = time.perf_counter(), 0
    try:
        for step in range(start_step + 1, total_steps + 1):
            position = (step - 1) * blocks_per_step
            sums: dict[str, torch.Tensor] = {}
            for m in range(config.grad_accum_steps):
                first = position + m * micro * world  # this micro-step's global batch ...
                global_idx = block_indices(first, micro * world, len(data), config.seed)
                local_idx = global_idx[rank * micro : (rank + 1) * micro]  # ... and this rank's slice
                step_tokens = int(data.real_tokens(global_idx).sum())
                tokens_seen += step_tokens
                window_tokens += step_tokens
                batch = {k: v.to(accelerator.device) for k, v in data.batch(local_idx).items()}
                with accelerator.accumulate(model):
                    outputs = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        labels=batch["labels"],
                        **({} if dense else {"output_router_logits": True}),
                    )
                    if dense:
                        loss, parts = outputs.loss, {"ntp": outputs.loss.detach().float(), "loss": outputs.loss.detach().float()}
                    else:
                        loss, parts = stage_loss(outputs, batch, config.stage, current_generation, config, expert_generation, top_k)
                        token_mask = batch["attention_mask"].reshape(-1).bool()
                        for layer, counts in expert_slot_counts(outputs.router_logits, token_mask, top_k).items():
                            window_slots[layer] = window_slots.get(layer, 0) + counts.detach()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # clip_grad_norm_ returns the total norm: with clipping off, measure it anyway (inf max)
                        norm = accelerator.clip_grad_norm_(trainable_params, config.max_grad_norm or float("inf"))
                        grad_norm = None if norm is None else norm.detach().float()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v / config.grad_accum_steps
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            session_steps += 1
            window_steps += 1
            for k, v in sums.items():
                window_sums[k] = window_sums.get(k, 0.0) + v

            record = None
            if step % config.log_every == 0 or step == total_steps:
                # mean over the steps since the last line and over processes
                stacked = accelerator.reduce(torch.stack([window_sums[k] / window_steps for k in sorted(sums)]), reduction="mean")
                now = time.perf_counter()
                elapsed = now - session_start
                record = {k: float(v) for k, v in zip(sorted(sums), stacked.tolist())}
                record.update(
                    step=step,
                    total_steps=total_steps,
                    lr=scheduler.get_last_lr()[0],
                    tokens_seen=tokens_seen,
                    tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                    elapsed_s=elapsed,
                    eta_s=elapsed / session_steps * (total_steps - step),
                )
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if window_slots:
                    record["expert_load"] = _load_fractions(accelerator, window_slots)
                final_losses = {k: record[k] for k in sorted(sums)}
                window_start, window_tokens, window_steps, window_sums, window_slots = now, 0, 0, {}, {}
            reporter.step(step, record)
            if on_step is not None and main:
                on_step({"step": step, "total_steps": total_steps, "tokens_seen": tokens_seen, **{k: float(v) for k, v in sums.items()}})
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(step)
    finally:
        reporter.close()

    # ---- verify the frozen weights, save. The last collective is the gather below: the main
    # process then verifies and writes alone, and nobody waits for it inside a collective.
    if is_sharded(accelerator):
        full = accelerator.get_state_dict(model)  # the one gather, onto the main process
        checksum_by_rank: list[str] = []
        if main:
            reference = _checkpoint_tensors(model_dir)
            ckpt.verify_frozen(((n, full[n]) for n in frozen_names if n in full),
                               {n: frozen_sums[n] for n in frozen_names if n in full}, reference=reference)
            final = _model_from_state_dict(model_dir, dense, full, storage_dtype, frozen=set(frozen_names),
                                           reference=reference)
    else:
        live = dict(unwrapped.named_parameters())
        ckpt.verify_frozen(((n, live[n]) for n in frozen_names), frozen_sums)
        checksum_by_rank = gather_object([_trainable_digest([(n, live[n]) for n in trainable_names])])
        final = unwrapped
        if main:
            final.to(storage_dtype)
    if main:
        if config.gradient_checkpointing:
            final.gradient_checkpointing_disable()
        if dense:
            final.save_pretrained(output_dir, safe_serialization=True)
            tokenizer.save_pretrained(output_dir)
        else:
            final.set_classifier_routing(config.stage == 2)
            save_layermoe(final, output_dir, tokenizer)

    num = {n: p.numel() for n, p in params.items()}
    return TrainResult(
        stage=config.stage,
        current_generation=current_generation,
        steps=total_steps,
        tokens_seen=tokens_seen,
        final_losses=final_losses,
        trainable_groups=list(DENSE_GROUPS) if dense else trainable_groups(config.stage, current_generation),
        trainable_parameters=sum(num[n] for n in trainable_names),
        frozen_parameters=sum(num[n] for n in frozen_names),
        frozen_checksums=frozen_sums,
        trainable_checksum_by_rank=list(checksum_by_rank),
        resumed_from_step=resumed_from,
        output_dir=str(output_dir),
        distributed=distributed,
        data={
            "languages": data.languages,
            "documents_per_language": data.documents_per_language,
            "tokens_per_language": data.tokens_per_language,
            "blocks": len(data),
            "seq_len": config.seq_len,
            "blocks_per_step": blocks_per_step,
            "prepared": str(prepared.path),
            "key": prepared.meta["key"],
        },
    )
