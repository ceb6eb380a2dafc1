"""Routing health of an expanded model: where do old and new languages' tokens actually go?

Everything is measured on the EFFECTIVE routing, i.e. with the routing classifier's decision
applied, because that is what the model computes: in a classifier layer a token the
classifier calls old (class 0) goes to expert 0 alone, whatever the router says. With a
classifier that has one class per generation (C > 2), a token classified as generation c
may only use experts of generations <= c. The router-only figure for old tokens is kept too
(`router_expert0_share`), so a classifier that hides a router that forgot its prior shows.

Per MoE layer (a layer with a router):
- expert0_share: share of tokens whose top-1 expert is expert 0, for old tokens
  (generation < current) and new ones (generation == current), per generation and per language;
- classifier accuracy on old and new tokens (binary classifier label: 0 for G0 tokens, 1 for
  the rest; per-generation classifier label: the token's generation);
- load: fraction of the top-k slots each expert receives. A token holds k slots (fewer if the
  layer has fewer experts); a token sent to expert 0 alone puts all its slots there.

Tokens are those of `evaluation/windows.py` (same documents, same cap), padding and the
prepended start token excluded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from layermoe_cli.errors import LayermoeError
from layermoe_cli.evaluation.bpb import model_device, pad_id_of
from layermoe_cli.evaluation.groups import generation_of
from layermoe_cli.evaluation.windows import batches, default_max_length, pad_batch, score_plan

EFFECTIVE_NOTE = (
    "effective routing: in classifier layers a token classified old goes to expert 0 alone, "
    "as the model computes it; router_expert0_share ignores the classifier"
)


@dataclass
class RoutingHealth:
    current_generation: int
    top_k: int
    layers: list[int]  # MoE layer indices, ascending
    experts_per_layer: list[int]  # E_i, aligned with `layers`
    expert_generations: list[list[int]]  # generation of each expert column, per layer
    classifier_layers: list[int]
    classifier_routing: bool  # False: the classifier only predicts (e.g. after stage 1), routing ignores it
    tokens: dict[str, int]  # routed tokens per language
    expert0_share: dict[str, list[float | None]]  # "old"/"new" -> per layer (effective)
    router_expert0_share: dict[str, list[float | None]]  # same, router alone
    expert0_share_by_generation: dict[str, list[float | None]]  # "0", "1", ... -> per layer
    expert0_share_by_language: dict[str, list[float | None]]
    classifier_accuracy: dict[str, list[float | None]]  # "old"/"new"/"all" -> per classifier layer
    load: list[list[float]]  # per layer, fraction of slots per expert (sums to 1)
    load_by_group: dict[str, list[list[float]]]  # "old"/"new" -> like `load`
    note: str = field(default=EFFECTIVE_NOTE)

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def effective_routing(
    router_logits: torch.Tensor,
    classifier_logits: torch.Tensor | None,
    expert_generation: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-1 expert [n], slot weights [n, E] (rows sum to 1) and classifier class [n] or None.

    router_logits [n, E] pre-softmax; classifier_logits [n, C]; expert_generation [E].
    Softmax is monotone, so top-k of the logits is top-k of the routing probabilities.
    """
    n, num_experts = router_logits.shape
    logits = router_logits.float()
    predicted = None
    if classifier_logits is not None:
        predicted = classifier_logits.float().argmax(dim=-1)  # [n]
        if classifier_logits.shape[-1] > 2:
            allowed = expert_generation.to(logits.device)[None, :] <= predicted[:, None]  # [n, E]
            logits = logits.masked_fill(~allowed, float("-inf"))
    k = min(top_k, num_experts)
    top = logits.topk(k, dim=-1)  # values, indices [n, k]
    slots = torch.zeros(n, num_experts, device=logits.device)
    slots.scatter_(1, top.indices, torch.isfinite(top.values).float())
    slots = slots / slots.sum(dim=-1, keepdim=True).clamp_min(1)
    top1 = top.indices[:, 0].clone()
    if predicted is not None:
        old = predicted == 0  # classified old: expert 0 alone, weight 1
        top1[old] = 0
        slots[old] = 0.0
        slots[old, 0] = 1.0
    return top1, slots, predicted


def classifier_label(generation: int, num_classes: int) -> int:
    """The class a token of `generation` should get: binary old(0)/new(1) = G0 vs the rest, else its generation."""
    if num_classes == 2:
        return 0 if generation == 0 else 1
    return generation


class _Tally:
    """Running counts per (layer, language); turned into shares at the end."""

    def __init__(self):
        self.tokens: dict[str, int] = {}
        self.expert0: dict[tuple[int, str], float] = {}
        self.router_expert0: dict[tuple[int, str], float] = {}
        self.load: dict[tuple[int, str], torch.Tensor] = {}
        self.correct: dict[tuple[int, str], float] = {}
        self.experts: dict[int, int] = {}

    def add(self, layer, language, router_logits, classifier_logits, expert_generation, label, top_k, classifier_decides):
        deciding = classifier_logits if classifier_decides else None
        top1, slots, _ = effective_routing(router_logits, deciding, expert_generation, top_k)
        predicted = None if classifier_logits is None else classifier_logits.float().argmax(dim=-1)
        key = (layer, language)
        self.experts[layer] = router_logits.shape[-1]
        self.expert0[key] = self.expert0.get(key, 0.0) + (top1 == 0).sum().item()
        self.router_expert0[key] = self.router_expert0.get(key, 0.0) + (router_logits.argmax(-1) == 0).sum().item()
        self.load[key] = self.load.get(key, 0.0) + slots.sum(dim=0).double().cpu()
        if predicted is not None:
            self.correct[key] = self.correct.get(key, 0.0) + (predicted == label).sum().item()


def _moe_outputs(output) -> tuple[dict, dict]:
    router = getattr(output, "router_logits", None)
    if router is None and isinstance(output, dict):
        router = output.get("router_logits")
    if not isinstance(router, dict):
        raise LayermoeError(
            "routing health needs an expanded layermoe model (its forward returns router_logits per MoE layer "
            "with output_router_logits=True): run `layermoe expand` first"
        )
    classifier = getattr(output, "classifier_logits", None)
    if classifier is None and isinstance(output, dict):
        classifier = output.get("classifier_logits")
    return router, classifier or {}


def _top_k_of(model) -> int:
    config = getattr(model, "config", None)
    for name in ("num_experts_per_tok", "top_k", "moe_top_k"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2


def _expert_generations(model, layer: int, num_experts: int) -> list[int]:
    lookup = getattr(model, "expert_generation_ids", None)
    if lookup is None:
        raise LayermoeError("the model has no expert_generation_ids(layer): routing health needs a layermoe expanded model")
    ids = lookup(layer)
    generations = [int(g) for g in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if len(generations) != num_experts:
        raise LayermoeError(f"layer {layer}: expert_generation_ids has {len(generations)} entries for {num_experts} router columns")
    return generations


def routing_health(
    model,
    tokenizer,
    texts_by_language: dict[str, list[str]],
    generation_of_language: dict[str, int],
    current_generation: int,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device=None,
    max_length: int | None = None,
    top_k: int | None = None,
) -> RoutingHealth:
    """Measure the effective routing of `model` on each language's texts (see module docstring).

    `max_tokens` caps the tokens per language; `top_k` defaults to the model config's
    `num_experts_per_tok` (or `top_k`), else 2. A model whose `config.classifier_routing` is
    False routes by the router alone; its classifier accuracy is still measured.
    """
    max_length = max_length or default_max_length(model)
    device = torch.device(device) if device is not None else model_device(model)
    top_k = top_k or _top_k_of(model)
    pad_id = pad_id_of(tokenizer)
    classifier_decides = bool(getattr(getattr(model, "config", None), "classifier_routing", True))
    tally = _Tally()
    expert_generation: dict[int, torch.Tensor] = {}
    languages = {lang: generation_of(lang, generation_of_language) for lang in texts_by_language}
    was_training = model.training
    model.eval()
    try:
        for language, texts in texts_by_language.items():
            generation = languages[language]
            plan = score_plan(tokenizer, texts, max_length=max_length, max_tokens=max_tokens, every_input=True)
            if plan.tokens == 0:
                raise LayermoeError(f"language '{language}' has no held-out text to route: give it at least one non-empty document")
            tally.tokens[language] = plan.tokens
            for batch in batches(plan.windows, batch_size):
                input_ids, attention_mask, _ = pad_batch(batch, pad_id)
                keep = attention_mask.bool()  # [B, L]
                for row, w in enumerate(batch):
                    if w.starts_document:
                        keep[row, 0] = False  # the start token belongs to no language
                keep = keep.reshape(-1).to(device)  # [T], row-major like the model's outputs
                with torch.inference_mode():
                    output = model(input_ids.to(device), attention_mask=attention_mask.to(device), output_router_logits=True)
                router, classifier = _moe_outputs(output)
                for layer, logits in router.items():
                    layer = int(layer)
                    if layer not in expert_generation:
                        expert_generation[layer] = torch.tensor(_expert_generations(model, layer, logits.shape[-1]))
                    cls = classifier.get(layer)
                    label = None
                    if cls is not None:
                        label = classifier_label(generation, num_classes=cls.shape[-1])
                        cls = cls[keep]
                    tally.add(layer, language, logits[keep], cls, expert_generation[layer], label, top_k, classifier_decides)
    finally:
        model.train(was_training)
    return _summarise(tally, languages, current_generation, top_k, expert_generation, classifier_decides)


def _summarise(tally: _Tally, languages: dict[str, int], current: int, top_k: int, expert_generation, classifier_decides) -> RoutingHealth:
    layers = sorted(tally.experts)
    classifier_layers = sorted({layer for layer, _ in tally.correct})
    groups = {
        "old": [lang for lang, g in languages.items() if g < current],
        "new": [lang for lang, g in languages.items() if g == current],
    }
    generations = sorted(set(languages.values()))

    def share(counts, layer, langs):
        return _ratio(sum(counts.get((layer, l), 0.0) for l in langs), sum(tally.tokens[l] for l in langs))

    def load_of(layer, langs):
        total = torch.zeros(tally.experts[layer], dtype=torch.float64)
        for l in langs:
            total += tally.load.get((layer, l), 0.0)
        mass = total.sum().item()
        return (total / mass).tolist() if mass else [0.0] * tally.experts[layer]

    routed = [lang for lang, g in languages.items() if g <= current]
    return RoutingHealth(
        current_generation=current,
        top_k=top_k,
        layers=layers,
        experts_per_layer=[tally.experts[layer] for layer in layers],
        expert_generations=[expert_generation[layer].tolist() for layer in layers],
        classifier_layers=classifier_layers,
        classifier_routing=classifier_decides,
        tokens=dict(tally.tokens),
        expert0_share={name: [share(tally.expert0, layer, langs) for layer in layers] for name, langs in groups.items()},
        router_expert0_share={name: [share(tally.router_expert0, layer, langs) for layer in layers] for name, langs in groups.items()},
        expert0_share_by_generation={
            str(g): [share(tally.expert0, layer, [l for l, lg in languages.items() if lg == g]) for layer in layers]
            for g in generations
        },
        expert0_share_by_language={lang: [share(tally.expert0, layer, [lang]) for layer in layers] for lang in languages},
        classifier_accuracy={
            name: [share(tally.correct, layer, langs) for layer in classifier_layers]
            for name, langs in {**groups, "all": routed}.items()
        },
        load=[load_of(layer, routed) for layer in layers],
        load_by_group={name: [load_of(layer, langs) for layer in layers] for name, langs in groups.items()},
        note=EFFECTIVE_NOTE if classifier_decides else "the classifier does not decide routing in this model: shares are of the router alone",
    )


def plot_routing(routing: dict, path) -> None:
    """routing.png from a RoutingHealth dict: expert-0 share per layer, and the load heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    layers = routing.get("layers") or []
    if not layers:
        raise LayermoeError("the routing record has no MoE layer to plot: the model was not expanded")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(layers))
    series = [
        (routing.get("expert0_share", {}).get("old"), "old tokens (effective)", "-o"),
        (routing.get("router_expert0_share", {}).get("old"), "old tokens (router alone)", "--o"),
        (routing.get("expert0_share", {}).get("new"), "new tokens (effective)", "-s"),
    ]
    for values, label, style in series:
        if values and any(v is not None for v in values):
            left.plot(x, [np.nan if v is None else v for v in values], style, label=label)
    left.set_xticks(x, [str(layer) for layer in layers])
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("layer")
    left.set_ylabel("share of tokens with top-1 = expert 0")
    left.set_title("Old-language tokens kept on expert 0")
    left.legend(fontsize=8)
    load = routing.get("load") or []
    width = max(len(row) for row in load) if load else 1
    grid = np.full((len(layers), width), np.nan)
    for i, row in enumerate(load):
        grid[i, : len(row)] = row
    image = right.imshow(grid.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    right.set_xticks(x, [str(layer) for layer in layers])
    right.set_xlabel("layer")
    right.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_ylabel("expert (0 = original FFN)")
    right.set_title("Load: fraction of top-k slots")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
