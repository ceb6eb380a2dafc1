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

from layermoe.core.errors import LayermoeError
from layermoe.core.plotting import pyplot, save_figure
from layermoe.evaluation.bpb import model_device, pad_id_of
from layermoe.evaluation.groups import generation_of
from layermoe.evaluation.windows import batches, default_max_length, pad_batch, score_plan

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


class LanguageRouting:
    """Routing counts of one language's tokens on one model, summed over batches.

    Counts, not shares, so parts measured at different times (the eval cache keeps one per
    model, language and texts) add up to the same figures as one measurement of them all.
    JSON-safe through `to_dict` / `from_dict`; every number is a float64 sum, which JSON
    round-trips exactly.
    """

    def __init__(self, top_k: int, classifier_routing: bool):
        self.top_k = top_k
        self.classifier_routing = classifier_routing
        self.tokens = 0
        self.expert_generations: dict[int, list[int]] = {}  # layer -> generation of each router column
        self.classifier_layers: list[int] = []
        self.expert0: dict[int, float] = {}  # layer -> tokens whose effective top-1 is expert 0
        self.router_expert0: dict[int, float] = {}  # same, router alone
        self.load: dict[int, torch.Tensor] = {}  # layer -> [E] float64 summed slot fractions
        self.correct: dict[int, float] = {}  # classifier layer -> tokens classified as their own generation

    def add(self, layer: int, router_logits, classifier_logits, expert_generation: torch.Tensor, label: int | None) -> None:
        """One batch of one layer: router_logits [n, E], classifier_logits [n, C] or None (n kept tokens)."""
        deciding = classifier_logits if self.classifier_routing else None
        top1, slots, _ = effective_routing(router_logits, deciding, expert_generation, self.top_k)
        self.expert_generations.setdefault(layer, [int(g) for g in expert_generation.tolist()])
        self.expert0[layer] = self.expert0.get(layer, 0.0) + (top1 == 0).sum().item()
        self.router_expert0[layer] = self.router_expert0.get(layer, 0.0) + (router_logits.argmax(-1) == 0).sum().item()
        self.load[layer] = self.load.get(layer, 0.0) + slots.sum(dim=0).double().cpu()
        if classifier_logits is not None:
            if layer not in self.classifier_layers:
                self.classifier_layers = sorted(self.classifier_layers + [layer])
            if label is not None:
                predicted = classifier_logits.float().argmax(dim=-1)
                self.correct[layer] = self.correct.get(layer, 0.0) + (predicted == label).sum().item()

    def to_dict(self) -> dict:
        def by_layer(values):
            return {str(layer): value for layer, value in values.items()}

        return {
            "top_k": self.top_k,
            "classifier_routing": self.classifier_routing,
            "tokens": self.tokens,
            "expert_generations": by_layer(self.expert_generations),
            "classifier_layers": list(self.classifier_layers),
            "expert0": by_layer(self.expert0),
            "router_expert0": by_layer(self.router_expert0),
            "load": {str(layer): value.tolist() for layer, value in self.load.items()},
            "correct": by_layer(self.correct),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LanguageRouting":
        part = cls(int(data["top_k"]), bool(data["classifier_routing"]))
        part.tokens = int(data["tokens"])
        part.expert_generations = {int(k): list(v) for k, v in data["expert_generations"].items()}
        part.classifier_layers = [int(layer) for layer in data["classifier_layers"]]
        part.expert0 = {int(k): float(v) for k, v in data["expert0"].items()}
        part.router_expert0 = {int(k): float(v) for k, v in data["router_expert0"].items()}
        part.load = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in data["load"].items()}
        part.correct = {int(k): float(v) for k, v in data["correct"].items()}
        return part


class RoutingRecorder:
    """Turns a forward pass's router/classifier logits into per-language counts.

    Shared by the single-pass measurement (`measure.py`) and `routing_health` below, so both
    count exactly the same tokens the same way.
    """

    def __init__(self, model, top_k: int | None = None):
        self.model = model
        self.top_k = top_k or _top_k_of(model)
        self.classifier_routing = bool(getattr(getattr(model, "config", None), "classifier_routing", True))
        self._expert_generation: dict[int, torch.Tensor] = {}

    def new_part(self) -> LanguageRouting:
        return LanguageRouting(self.top_k, self.classifier_routing)

    @staticmethod
    def kept_tokens(batch, attention_mask: torch.Tensor, device) -> torch.Tensor:
        """[B*L] bool, row-major like the model's router outputs: real tokens, each document's start token excluded."""
        keep = attention_mask.bool().clone()  # [B, L]
        for row, w in enumerate(batch):
            if w.starts_document:
                keep[row, 0] = False  # the start token belongs to no language
        return keep.reshape(-1).to(device)

    def record(self, part: LanguageRouting, output, keep: torch.Tensor, generation: int | None) -> None:
        router, classifier = _moe_outputs(output)
        for layer, logits in router.items():
            layer = int(layer)
            if layer not in self._expert_generation:
                self._expert_generation[layer] = torch.tensor(_expert_generations(self.model, layer, logits.shape[-1]))
            cls = classifier.get(layer)
            label = None
            if cls is not None:
                label = None if generation is None else classifier_label(generation, num_classes=cls.shape[-1])
                cls = cls[keep]
            part.add(layer, logits[keep], cls, self._expert_generation[layer], label)


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
    pad_id = pad_id_of(tokenizer)
    recorder = RoutingRecorder(model, top_k)
    languages = {lang: generation_of(lang, generation_of_language) for lang in texts_by_language}
    parts: dict[str, LanguageRouting] = {}
    was_training = model.training
    model.eval()
    try:
        for language, texts in texts_by_language.items():
            plan = score_plan(tokenizer, texts, max_length=max_length, max_tokens=max_tokens, every_input=True)
            if plan.tokens == 0:
                raise LayermoeError(f"language '{language}' has no held-out text to route: give it at least one non-empty document")
            part = parts[language] = recorder.new_part()
            part.tokens = plan.tokens
            for batch in batches(plan.windows, batch_size):
                input_ids, attention_mask, _ = pad_batch(batch, pad_id)
                keep = recorder.kept_tokens(batch, attention_mask, device)
                with torch.inference_mode():
                    output = model(input_ids.to(device), attention_mask=attention_mask.to(device), output_router_logits=True)
                recorder.record(part, output, keep, languages[language])
    finally:
        model.train(was_training)
    return summarise_routing(parts, languages, current_generation)


def summarise_routing(parts: dict[str, LanguageRouting], generation_of_language: dict[str, int], current: int) -> RoutingHealth:
    """RoutingHealth from per-language counts (every part from the same model). See the module docstring."""
    if not parts:
        raise LayermoeError("no language to summarise the routing of")
    languages = {lang: int(generation_of_language[lang]) for lang in parts}
    first = next(iter(parts.values()))
    top_k, classifier_decides = first.top_k, first.classifier_routing
    expert_generations = {}
    for part in parts.values():
        expert_generations.update(part.expert_generations)
    layers = sorted(expert_generations)
    classifier_layers = sorted({layer for part in parts.values() for layer in part.classifier_layers})
    experts = {layer: len(expert_generations[layer]) for layer in layers}
    groups = {
        "old": [lang for lang, g in languages.items() if g < current],
        "new": [lang for lang, g in languages.items() if g == current],
    }
    generations = sorted(set(languages.values()))

    def share(counts: str, layer, langs):
        return _ratio(sum(getattr(parts[l], counts).get(layer, 0.0) for l in langs), sum(parts[l].tokens for l in langs))

    def load_of(layer, langs):
        total = torch.zeros(experts[layer], dtype=torch.float64)
        for l in langs:
            total += parts[l].load.get(layer, 0.0)
        mass = total.sum().item()
        return (total / mass).tolist() if mass else [0.0] * experts[layer]

    routed = [lang for lang, g in languages.items() if g <= current]
    return RoutingHealth(
        current_generation=current,
        top_k=top_k,
        layers=layers,
        experts_per_layer=[experts[layer] for layer in layers],
        expert_generations=[expert_generations[layer] for layer in layers],
        classifier_layers=classifier_layers,
        classifier_routing=classifier_decides,
        tokens={lang: part.tokens for lang, part in parts.items()},
        expert0_share={name: [share("expert0", layer, langs) for layer in layers] for name, langs in groups.items()},
        router_expert0_share={name: [share("router_expert0", layer, langs) for layer in layers] for name, langs in groups.items()},
        expert0_share_by_generation={
            str(g): [share("expert0", layer, [l for l, lg in languages.items() if lg == g]) for layer in layers]
            for g in generations
        },
        expert0_share_by_language={lang: [share("expert0", layer, [lang]) for layer in layers] for lang in languages},
        classifier_accuracy={
            name: [share("correct", layer, langs) for layer in classifier_layers]
            for name, langs in {**groups, "all": routed}.items()
        },
        load=[load_of(layer, routed) for layer in layers],
        load_by_group={name: [load_of(layer, langs) for layer in layers] for name, langs in groups.items()},
        note=EFFECTIVE_NOTE if classifier_decides else "the classifier does not decide routing in this model: shares are of the router alone",
    )


def plot_routing(routing: dict, path) -> None:
    """routing.png from a RoutingHealth dict: expert-0 share per layer, and the load heatmap."""
    import matplotlib.ticker
    import numpy as np

    plt = pyplot()

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
    save_figure(fig, path, dpi=110)
