"""What a stage starts from: its data, its model with the right weights frozen, and its length.

Stage 1 trains this generation's new experts and the routers; stage 2 the routers and the routing
classifiers (METHOD.md sec. 4). A plain Hugging Face causal LM (not a layermoe checkpoint) trains
as a dense full fine-tune: stage 1 only, every weight trainable.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from layermoe.compat import model_loading_options
from layermoe.core.errors import LayermoeError
from layermoe.data import PackedData, PreparedData, Source, open_prepared, prepare_or_wait
from layermoe.modeling import load_layermoe, parameter_groups
from layermoe.training import checkpoint as ckpt
from layermoe.training.config import TrainConfig
from layermoe.training.distributed import broadcast_from_main  # noqa: F401  (re-exported)

DENSE_GROUPS = ["all"]  # what a dense full fine-tune trains


def is_layermoe_checkpoint(model_dir: Path) -> bool:
    """True for a checkpoint written by the expand step, False for a plain HF causal LM."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type") == "layermoe"
    except (OSError, ValueError):
        raise LayermoeError(f"{model_dir} has no readable config.json; give a checkpoint directory") from None


def trainable_groups(stage: int, current_generation: int) -> list[str]:
    """Parameter groups (keys of `modeling.parameter_groups`) trained in a stage."""
    if stage == 1:
        return [f"experts_g{current_generation}", "router"]
    return ["router", "classifier"]


def freeze_for_stage(model, stage: int, current_generation: int) -> list[str]:
    """Set requires_grad for the stage; return the trainable parameter names (model order)."""
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


def plan_steps(config: TrainConfig, num_blocks: int, blocks_per_step: int) -> int:
    """Optimizer steps: max_steps, else token_budget / tokens per step, else epochs over the blocks."""
    if config.max_steps is not None:
        return config.max_steps
    if config.token_budget is not None:
        return max(1, math.ceil(config.token_budget / (blocks_per_step * config.seq_len)))
    return max(1, math.ceil(config.epochs * num_blocks / blocks_per_step))


def make_scheduler(optimizer, config: TrainConfig, total_steps: int):
    warmup = config.warmup_steps or int(round(config.warmup_ratio * total_steps))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def trainable_digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """One sha256 over named tensors (each process's trainable weights: equal on every rank after a step)."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(ckpt.tensor_sha256(t).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- data


@dataclass
class StageData:
    tokenizer: object
    prepared: PreparedData
    blocks: PackedData  # the prepared data as fixed-length blocks


def load_stage_data(model_dir: Path, config: TrainConfig, current_generation: int, work_dir: Path,
                    generation_of_language: Mapping[str, int], prepared_dir: Path | None,
                    texts_by_language: Mapping[str, Sequence[str]] | None, show_progress: bool) -> StageData:
    """The stage's data: prepared already (`layermoe prepare`), or prepared here from in-memory texts.

    Prepared before any process group exists, so no collective call waits on it; every rank then
    only memory-maps it.
    """
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
    return StageData(tokenizer, prepared, PackedData(prepared, config.seq_len, pad_id))


# ---------------------------------------------------------------- model


@dataclass
class StageModel:
    model: torch.nn.Module
    dense: bool  # a plain causal LM: the dense full fine-tune
    storage_dtype: torch.dtype  # the checkpoint's dtype, restored when the model is saved
    trainable_names: list[str]
    frozen_names: list[str]
    frozen_sums: dict[str, str]  # name (or name[a:b] for frozen rows) -> value checksum, verified after training
    expert_generation: dict[int, torch.Tensor] | None  # MoE layer -> generation of each router column
    top_k: int | None
    frozen_rows: dict[str, list[tuple[int, int]]] | None = None  # trainable embeddings: their frozen row ranges

    def frozen_views(self, tensors: Mapping[str, torch.Tensor]):
        """(checksum key, tensor) of everything frozen: whole tensors, and the frozen rows of trainable ones."""
        for name in self.frozen_names:
            if name in tensors:
                yield name, tensors[name]
        for name, ranges in (self.frozen_rows or {}).items():
            if name in tensors:
                for start, end in ranges:
                    yield f"{name}[{start}:{end}]", tensors[name][start:end]


def vocabulary_rows(model, stage: int, current_generation: int) -> tuple[int, int] | None:
    """The embedding rows stage 1 trains: this generation's new tokens ([start, end)); None when it added none.

    Stage 2 trains routers and classifiers only, so every embedding row stays frozen there."""
    sizes = getattr(model.config, "vocab_sizes", None)
    if stage != 1 or not sizes or len(sizes) <= current_generation:
        return None
    start, end = int(sizes[current_generation - 1]), int(sizes[current_generation])
    return (start, end) if end > start else None


def train_rows_only(model, rows: tuple[int, int]) -> dict[str, list[tuple[int, int]]]:
    """Make the embedding (and an untied lm_head) trainable in `rows` only: the other rows' gradients
    are masked to exactly 0, so AdamW (no weight decay on them: see the optimizer) never moves them.
    Returns {parameter name: its frozen row ranges}."""
    start, end = rows
    names = {id(p): n for n, p in model.named_parameters()}
    inner = getattr(model, "lm", model)
    params = [inner.get_input_embeddings().weight]
    output = inner.get_output_embeddings()
    if output is not None and output.weight is not params[0]:
        params.append(output.weight)
    frozen = {}
    for param in params:
        total = param.shape[0]
        mask = torch.zeros(total, 1, dtype=param.dtype, device=param.device)
        mask[start:end] = 1
        param.requires_grad_(True)
        param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
        frozen[names[id(param)]] = [(0, start)] + ([(end, total)] if end < total else [])
    return frozen


def load_stage_model(model_dir: Path, config: TrainConfig, current_generation: int) -> StageModel:
    """The model a stage trains, in fp32 master weights, with the stage's parameters trainable."""
    dense = not is_layermoe_checkpoint(model_dir)
    if dense and config.stage != 1:
        raise LayermoeError(f"{model_dir} is a dense model: it has no router, so only stage 1 (a full fine-tune) applies")
    # Under FSDP with cpu_ram_efficient_loading, transformers loads the weights on the first
    # process only; the others build the model on the meta device and get their shards later.
    if dense:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **model_loading_options())
    else:
        model = load_layermoe(model_dir)
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
        # The classifier is trained in stage 2 only. Stage 1 trains and saves with the router alone
        # deciding (an untrained classifier would send random new-language tokens to expert 0);
        # stage 2 turns classifier routing on, and its output keeps it on.
        model.set_classifier_routing(config.stage == 2)
    frozen_rows = None
    rows = None if dense else vocabulary_rows(model, config.stage, current_generation)
    if rows is not None:  # this generation's new tokens train with its experts; every other row stays
        frozen_rows = train_rows_only(model, rows)
        trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = dict(model.named_parameters())
    trainable = set(trainable_names)
    frozen_names = [n for n in params if n not in trainable]
    stage = StageModel(model, dense, storage_dtype, trainable_names, frozen_names, {}, None, None, frozen_rows)
    on_meta = any(params[n].is_meta for n in frozen_names)
    frozen_sums = {} if on_meta else ckpt.frozen_checksums(stage.frozen_views(params))
    expert_generation = top_k = None
    if not dense:
        expert_generation = {i: torch.tensor(model.expert_generation_ids(i)) for i in model.config.moe_layers}
        top_k = next(iter(model.moe_blocks().values())).top_k  # the routers' k, as the model routes
    return StageModel(model, dense, storage_dtype, trainable_names, frozen_names, frozen_sums, expert_generation, top_k,
                      frozen_rows)
