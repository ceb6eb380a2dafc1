"""Expand a model: dense -> MoE (G1), then one more generation of experts at a time (G2, ...).

Every new expert starts as an exact copy of expert 0, so right after expansion the model
computes what it computed before (METHOD.md sec. 3 and 5). Not copied into checkpoints.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from layermoe.compat import model_loading_options
from layermoe.core.errors import LayermoeError
from layermoe.core.integrity import check_readable_weights
from layermoe.modeling.configuration_layermoe import LayermoeConfig
from layermoe.modeling.modeling_layermoe import (
    LayermoeExpertGroup,
    LayermoeForCausalLM,
    LayermoeMoeBlock,
    decoder_layers,
)
from layermoe.vocabulary.files import save_clean_tokenizer

ROUTER_INITS = ("expert0", "source", "mean", "zeros", "normal", "reinit")
# The files a checkpoint carries so that it loads with trust_remote_code=True without layermoe:
# name in the checkpoint -> source file in this package.
_SELF_CONTAINED_FILES = {
    "configuration_layermoe.py": Path(__file__).parent / "configuration_layermoe.py",
    "modeling_layermoe.py": Path(__file__).parent / "modeling_layermoe.py",
    "compat.py": Path(__file__).parent.parent / "compat.py",  # the one module of library shims
}
_SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")


def _check_base(base_model: nn.Module, new_experts_per_layer) -> int:
    model_type = getattr(base_model.config, "model_type", None)
    if model_type == "layermoe":
        raise LayermoeError("the model is already a layermoe model; use add_generation to add experts")
    try:
        layers = decoder_layers(base_model)
    except ValueError as err:
        raise LayermoeError(f"cannot upcycle model type {model_type!r}: {err}") from None
    for layer in layers:
        mlp = layer.mlp
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise LayermoeError(
                f"cannot upcycle model type {model_type!r}: its MLP is not gate/up/down; supported: {', '.join(_SUPPORTED_FAMILIES)}"
            )
        if any(getattr(mlp, a).bias is not None for a in ("gate_proj", "up_proj", "down_proj")):
            raise LayermoeError(f"cannot upcycle model type {model_type!r}: MLPs with bias are not supported")
    if len(new_experts_per_layer) != len(layers):
        raise LayermoeError(
            f"got {len(new_experts_per_layer)} new-expert counts for a model with {len(layers)} layers; give one count per layer"
        )
    if any(int(n) < 0 for n in new_experts_per_layer):
        raise LayermoeError("a new-expert count is negative; counts must be >= 0 (0 keeps the layer dense)")
    return len(layers)


def _check_classifier_layers(classifier_layers, counts_total: list[int]) -> list[int]:
    layers = sorted({int(i) for i in classifier_layers})
    bad = [i for i in layers if not 0 <= i < len(counts_total) or counts_total[i] <= 1]
    if bad:
        raise LayermoeError(f"classifier layers {bad} are not MoE layers; put classifiers only on layers that got new experts")
    return layers


def _router_std(config) -> float:
    return float(getattr(config, "initializer_range", None) or 0.02)


def _seeded_normal(shape, std: float, seed: int, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(device=like.device, dtype=like.dtype)


def public_model_name(name_or_path: str | None) -> str | None:
    """The base model's name as a checkpoint may carry it: a hub id, never this machine's path.

    A hub cache snapshot (`.../models--org--name/snapshots/<sha>`) gives `org/name`; another local
    path gives its folder's name; a hub id is kept as it is."""
    if not name_or_path:
        return name_or_path
    path = Path(name_or_path)
    if not (path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()):
        return name_or_path  # a hub id ("org/name")
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return path.name or name_or_path


def upcycle(
    base_model,
    new_experts_per_layer: list[int],
    classifier_layers=(),
    top_k: int = 2,
    classifier_granularity: str = "token",
    classifier_classes: int = 2,
    seed: int = 0,
    inplace: bool = False,
) -> LayermoeForCausalLM:
    """Dense model -> LayerMoE (generation G1). Function-preserving.

    new_experts_per_layer[i]: new experts for layer i (0 keeps the layer dense).
    Router init: N(0, initializer_range) (seeded): since every expert is a copy of expert 0,
    any routing gives the base output, and random rows break the tie between experts.
    Classifier init: same. `inplace=True` reuses base_model's modules instead of copying.
    """
    num_layers = _check_base(base_model, new_experts_per_layer)
    counts = [int(n) for n in new_experts_per_layer]
    totals = [1 + n for n in counts]
    cls_layers = _check_classifier_layers(classifier_layers, totals)
    if cls_layers and classifier_classes != 2:
        raise LayermoeError(f"classifier_classes={classifier_classes} after one generation; it must be 2 (old/new)")
    base_cfg = base_model.config.to_dict()
    try:
        config = LayermoeConfig(
            base_config=base_cfg,
            new_experts=[[n] for n in counts],
            classifier_layers=cls_layers,
            classifier_classes=classifier_classes,
            classifier_granularity=classifier_granularity,
            num_experts_per_tok=top_k,
        )
    except ValueError as err:
        raise LayermoeError(str(err)) from None
    config.dtype = base_model.dtype
    assert config.num_hidden_layers == num_layers
    lm = base_model if inplace else copy.deepcopy(base_model)
    model = LayermoeForCausalLM(config, lm=lm)
    std = _router_std(base_model.config)
    with torch.no_grad():
        for i, block in model.moe_blocks().items():
            block.experts["g1"].copy_from_mlp(block.expert0)
            block.router.weight.copy_(_seeded_normal(block.router.weight.shape, std, seed + i, block.router.weight))
            if block.classifier is not None:
                w = block.classifier.weight
                w.copy_(_seeded_normal(w.shape, std, seed + 1000 + i, w))
    model.train(base_model.training)
    return model


def _new_router_rows(old: torch.Tensor, n_new: int, router_init: str, std: float, seed: int, source: int = 0) -> torch.Tensor:
    """Rows for `n_new` new experts given the learned router `old` [E_old, H] -> [n_new, H]."""
    if router_init in ("expert0", "source"):
        row = 0 if router_init == "expert0" else source
        return old[row : row + 1].expand(n_new, -1).clone()
    if router_init == "mean":
        return old.float().mean(0, keepdim=True).expand(n_new, -1).to(old.dtype).clone()
    if router_init == "zeros":
        return old.new_zeros(n_new, old.shape[1])
    return _seeded_normal((n_new, old.shape[1]), std, seed, old)


def add_generation(
    model: LayermoeForCausalLM,
    new_experts_per_layer: list[int],
    classifier_layers=(),
    router_init: str = "expert0",
    classifier_classes: int | None = None,
    seed: int = 0,
    expert_sources: list[int] | None = None,
) -> LayermoeForCausalLM:
    """Lifelong expansion: add generation G(n+1) to a LayerMoE model, in place (also returned).

    Per layer: a new expert group, router rows appended with the learned rows kept. The new
    experts are copies of expert 0, or with `expert_sources` (one router column per layer) of
    that existing expert (`extend --expert-init routed`). router_init for the new rows:
      "expert0" (default): copy expert 0's row, so each new expert ties with expert 0 and stage 1
          routes new-language tokens to them quickly. Earlier tokens are not undisturbed: the tied
          rows take softmax mass and top-k slots, so a token whose top-k was {expert 0, an earlier
          expert} can now pick a copy of expert 0 instead, and its output can move (the drift
          `extend` measures per earlier language; README, "Extending");
      "source": copy the row of the expert the new experts copy (the same tie, with the source
          expert; equal to "expert0" without `expert_sources`);
      "mean": mean of the learned rows; "zeros"; "normal": N(0, init std);
      "reinit": every row, the learned ones too, drawn afresh (Xavier normal, seeded): the authors' G2,
          which throws away what the router learned (METHOD.md sec. 5).
    Classifiers are rebuilt on `classifier_layers` with one class per generation, G0..G(n+1)
    (or `classifier_classes`; 2 keeps the paper's binary old/new), keeping learned rows where a layer keeps its classifier; new rows
    and new classifiers are N(0, init std). Layers that get no new expert stay as they were.
    """
    if router_init not in ROUTER_INITS:
        raise LayermoeError(f"router_init={router_init!r}; use one of {', '.join(ROUTER_INITS)}")
    config: LayermoeConfig = model.config
    layers = decoder_layers(model.lm)
    if len(new_experts_per_layer) != len(layers):
        raise LayermoeError(
            f"got {len(new_experts_per_layer)} new-expert counts for a model with {len(layers)} layers; give one count per layer"
        )
    counts = [int(n) for n in new_experts_per_layer]
    if any(n < 0 for n in counts):
        raise LayermoeError("a new-expert count is negative; counts must be >= 0 (0 leaves the layer as it is)")
    sources = [0] * len(layers) if expert_sources is None else [int(e) for e in expert_sources]
    if len(sources) != len(layers):
        raise LayermoeError(f"got {len(sources)} source experts for a model with {len(layers)} layers; give one per layer")
    for i, (source, existing) in enumerate(zip(sources, config.experts_per_layer)):
        if not 0 <= source < existing:
            raise LayermoeError(f"layer {i} has experts 0..{existing - 1}; it cannot copy expert {source}")
    new_rows = [row + [n] for row, n in zip(config.new_experts, counts)]
    totals = [1 + sum(row) for row in new_rows]
    cls_layers = _check_classifier_layers(classifier_layers, totals)
    generation = config.num_generations + 1
    classes = classifier_classes if classifier_classes is not None else generation + 1
    if cls_layers and not 2 <= classes <= generation + 1:
        raise LayermoeError(f"classifier_classes={classes} must be between 2 and {generation + 1} after G{generation}")
    std = _router_std(config)

    with torch.no_grad():
        for i, layer in enumerate(layers):
            n = counts[i]
            old_block = layer.mlp if isinstance(layer.mlp, LayermoeMoeBlock) else None
            if n == 0 and old_block is None and i not in cls_layers:
                continue  # dense before, dense now
            expert0 = old_block.expert0 if old_block is not None else layer.mlp
            block = LayermoeMoeBlock(
                expert0,
                new_rows[i],
                top_k=config.num_experts_per_tok,
                classifier_classes=classes if i in cls_layers else 0,
                classifier_granularity=config.classifier_granularity,
                classifier_routing=config.classifier_routing,
                moe_kernel=config.moe_kernel,
            )
            # Earlier generations: reuse the very same modules (and Parameters).
            if old_block is not None:
                for name, group in old_block.experts.items():
                    block.experts[name] = group
            if n > 0:
                _copy_source(block.experts[f"g{generation}"], old_block, expert0, sources[i])
            # Router: learned rows kept, new rows appended.
            w = block.router.weight  # [E_new, H]
            if router_init == "reinit":
                fan_out, fan_in = w.shape
                w.copy_(_seeded_normal(w.shape, (2.0 / (fan_in + fan_out)) ** 0.5, seed + i, w))
            elif old_block is not None:
                old_w = old_block.router.weight
                w[: old_w.shape[0]].copy_(old_w)
                if n > 0:
                    w[old_w.shape[0] :].copy_(_new_router_rows(old_w, n, router_init, std, seed + i, sources[i]))
            else:  # a layer that was dense gets a fresh router
                w.copy_(_seeded_normal(w.shape, std, seed + i, w))
            # Classifier: learned rows kept, one more class.
            if block.classifier is not None:
                cw = block.classifier.weight  # [C, H]
                cw.copy_(_seeded_normal(cw.shape, std, seed + 1000 + i, cw))
                if old_block is not None and old_block.classifier is not None:
                    kept = min(old_block.classifier.weight.shape[0], cw.shape[0])
                    cw[:kept].copy_(old_block.classifier.weight[:kept])
            block.train(layer.mlp.training)
            layer.mlp = block

    config.new_experts = new_rows
    config.classifier_layers = cls_layers
    config.classifier_classes = classes if cls_layers else config.classifier_classes
    try:
        config.validate_expansion()
    except ValueError as err:
        raise LayermoeError(str(err)) from None
    return model


def _copy_source(group: LayermoeExpertGroup, block: LayermoeMoeBlock | None, expert0: nn.Module, source: int) -> None:
    """Start every expert of `group` as a copy of router column `source` of the existing layer."""
    if source == 0:
        group.copy_from_mlp(expert0)
        return
    for _, existing, lo, hi in block.expert_ranges():
        if lo <= source < hi:
            group.copy_from_expert(existing, source - lo)
            return
    raise AssertionError(f"expert {source} not found")  # checked by add_generation


def save_layermoe(model: LayermoeForCausalLM, out_dir, tokenizer=None) -> Path:
    """save_pretrained (safetensors + config.json) + the self-contained model files + auto_map.

    The directory then loads in a fresh process with
    `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = {
        "AutoConfig": "configuration_layermoe.LayermoeConfig",
        "AutoModelForCausalLM": "modeling_layermoe.LayermoeForCausalLM",
    }
    model.config.architectures = ["LayermoeForCausalLM"]
    if model.config.base_config.get("_name_or_path"):  # the base's name, not where this machine keeps it
        model.config.base_config["_name_or_path"] = public_model_name(model.config.base_config["_name_or_path"])
    model.save_pretrained(out_dir, safe_serialization=True)
    for name, source in _SELF_CONTAINED_FILES.items():
        shutil.copyfile(source, out_dir / name)
    if tokenizer is not None:
        save_clean_tokenizer(tokenizer, out_dir)
    return out_dir


def load_layermoe(directory, device=None, dtype=None) -> LayermoeForCausalLM:
    """Load a checkpoint written by `save_layermoe` with this package's classes (no remote code)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LayermoeError(f"{directory} has no config.json; give the directory written by the expand step")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "layermoe":
        raise LayermoeError(f"{directory} holds a {model_type!r} model, not a layermoe one; run the expand step first")
    check_readable_weights(directory)  # a truncated file: one line, not the loader's traceback
    kwargs = model_loading_options()
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = LayermoeForCausalLM.from_pretrained(directory, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


__all__ = ["ROUTER_INITS", "add_generation", "load_layermoe", "public_model_name", "save_layermoe", "upcycle"]
