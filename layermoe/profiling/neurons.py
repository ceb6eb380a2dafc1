"""Language-specific FFN neurons (NeuronMoE, arXiv 2603.05046), read in the profile's forward pass.

A neuron is one channel of an FFN's intermediate activation `act(gate_proj(h)) * up_proj(h)`,
the input of `down_proj` (intermediate_size neurons per layer). Following the self-conditioning
method the authors build on (Kojima et al., NAACL 2024), a neuron's response to a document is
its activation averaged over the document's counted tokens (mean pooling), and its expertise
for language L is the average precision (AP) of that response as a score that ranks L's
documents above the other profiled languages' documents:

    AP_L(j) = (1 / |pos|) sum_{d in pos} precision at threshold r_j(d)
            = (1 / |pos|) sum_{d in pos} |{pos d' : r_j(d') >= r_j(d)}| / |{d' : r_j(d') >= r_j(d)}|

(ties share one threshold, as in scikit-learn's `average_precision_score`). Per language, the
top-N neurons by AP over the whole model (all layers ranked together, as the authors' code
does with its top-1000 file); per layer, the number of unique neurons in the union of the
languages' top-N sets. That count guides `allocate --strategy neuron`.

Memory does not grow with the token count: at most `max_documents` documents per language are
pooled (the first ones of the seeded sample), so the responses take languages x max_documents x
layers x intermediate_size float32 values, and AP is exact on that sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from layermoe.core.errors import LayermoeError
from layermoe.profiling.hsa import decoder_layers
from layermoe.profiling.settings import NEURON_DOCUMENTS

_AP_CHUNK_ELEMENTS = 1 << 24  # documents x neurons sorted at once (bounds the AP's scratch memory)


# ---------------------------------------------------------------------------- average precision


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Exact AP of every column of `scores` [n, U] for the labels `positive` [n] (bool): float64 [U].

    NaN for a column when there is no positive.
    """
    return average_precisions(scores, positive.long(), 2)[1]


def average_precisions(scores: torch.Tensor, owner: torch.Tensor, classes: int) -> torch.Tensor:
    """AP of every column of `scores` [n, U] for each class c (documents with owner [n] == c as positives).

    Returns float64 [classes, U] on the CPU (NaN for a class without documents). Each column is
    sorted once for all classes (descending); a document's precision is read at the end of its
    tie group, so tied scores form one threshold. Runs on the device of `scores`, in chunks of
    columns so that the sort's scratch memory stays bounded.
    """
    n, units = scores.shape
    owner = owner.to(scores.device)
    positives = torch.bincount(owner, minlength=classes).double()  # [C]
    out = torch.empty((classes, units), dtype=torch.float64)
    chunk = max(1, _AP_CHUNK_ELEMENTS // max(n, 1))
    rank = torch.arange(1, n + 1, device=scores.device, dtype=torch.float64)  # 1-based rank of each sorted position
    positives = positives.to(scores.device)
    for start in range(0, units, chunk):
        block = scores[:, start : start + chunk].t().contiguous()  # [u, n]: rows sort faster than columns
        values, order = block.sort(dim=1, descending=True)
        sorted_owner = owner[order]  # [u, n]
        last = torch.ones_like(sorted_owner, dtype=torch.bool)
        last[:, :-1] = values[:, :-1] != values[:, 1:]  # the last document of each tie group
        rows = slice(start, start + block.shape[0])
        # Without ties, the k-th document of class c (k = 1..P_c) at sorted rank r contributes k / r.
        # Every row holds the same documents, so grouping ranks by class (a stable sort of the
        # owners) gives the same segment [offset_c, offset_c + P_c) in every row.
        ranks = rank[sorted_owner.argsort(dim=1, stable=True)]  # [u, n] ranks grouped by class
        offset = 0
        for c, count in enumerate(positives.long().tolist()):
            k = torch.arange(1, count + 1, device=scores.device, dtype=torch.float64)
            out[c, rows] = ((k / ranks[:, offset : offset + count]).sum(1) / count).cpu() if count else float("nan")
            offset += count
        tied = (~last.all(1)).nonzero().squeeze(1)  # rows with tied scores: redo them exactly
        if tied.numel():
            t_last, t_owner = last[tied], sorted_owner[tied]
            group_end = torch.where(t_last, torch.arange(n, device=scores.device), n).flip(1).cummin(1).values.flip(1)
            for c in range(classes):  # precision at the end of each tie group, class by class
                hits = t_owner == c
                precision = hits.cumsum(1, dtype=torch.float64).gather(1, group_end) / (group_end + 1)
                out[c, start + tied.cpu()] = ((precision * hits).sum(1) / positives[c]).cpu()
    return out


# ---------------------------------------------------------------------------- reading the neurons


@contextmanager
def capture_ffn_neurons(
    model: nn.Module, on_activation: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], None]
) -> Iterator[None]:
    """While active, call `on_activation(layer, activation_of)` on every forward of every layer.

    `activation_of(rows)` returns the FFN intermediate activation [len(rows), T, I] of those
    batch rows. A dense FFN is read at its down_proj input (no extra compute). For a LayerMoE
    block, expert 0's neurons are used (the base FFN: the same neuron identities as at G1, and
    the FFN every old-language token still goes through); expert 0 only runs on the tokens
    routed to it, so its activation is recomputed from the block input for the rows asked for.
    """
    handles = []

    def dense_hook(index: int):
        def hook(module, args):
            activation = args[0]  # [B, T, I]
            on_activation(index, lambda rows: activation[rows])

        return hook

    def moe_hook(index: int, expert0: nn.Module):
        def hook(module, args, kwargs):
            hsa = args[0] if args else kwargs.get("hidden_states")

            def activation_of(rows: torch.Tensor) -> torch.Tensor:
                h = hsa[rows]
                return expert0.act_fn(expert0.gate_proj(h)) * expert0.up_proj(h)

            on_activation(index, activation_of)

        return hook

    try:
        for i, layer in enumerate(decoder_layers(model)):
            mlp = layer.mlp
            expert0 = getattr(mlp, "expert0", None)
            if expert0 is not None:
                handles.append(mlp.register_forward_pre_hook(moe_hook(i, expert0), with_kwargs=True))
            elif all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                handles.append(mlp.down_proj.register_forward_pre_hook(dense_hook(i)))
            else:
                raise LayermoeError(f"cannot read the FFN neurons of layer {i} ({type(mlp).__name__}): expected a "
                                    "gate/up/down MLP; profile with --neuron-top-n 0 to skip the neuron count")
        yield
    finally:
        for handle in handles:
            handle.remove()


def intermediate_size(model: nn.Module) -> int:
    mlp = decoder_layers(model)[0].mlp
    mlp = getattr(mlp, "expert0", mlp)
    return int(mlp.down_proj.weight.shape[1])


# ---------------------------------------------------------------------------- accumulation


class NeuronAccumulator:
    """Mean-pooled FFN responses of up to `max_documents` documents per language, per layer.

    Pooled responses are float32 on the CPU: [documents, intermediate] per language and layer.
    """

    def __init__(self, num_layers: int, max_documents: int = NEURON_DOCUMENTS):
        if max_documents < 1:
            raise LayermoeError(f"documents per language for the neuron count must be at least 1, got {max_documents}")
        self.num_layers = num_layers
        self.max_documents = max_documents
        self._pooled: dict[str, list[list[torch.Tensor]]] = {}  # language -> layer -> chunks [b, I]

    def add(self, language: str, layer: int, activation: torch.Tensor, mask: torch.Tensor) -> None:
        """Pool activation [b, T, I] over the positions where mask [b, T] is True (one row per document)."""
        weights = mask.to(activation.device, torch.float32)  # [b, T]
        counts = weights.sum(1, keepdim=True)  # [b, 1]
        pooled = torch.einsum("bti,bt->bi", activation.float(), weights) / counts.clamp(min=1)  # [b, I]
        pooled = pooled[counts[:, 0] > 0]  # a row with no counted token is no document
        self._pooled.setdefault(language, [[] for _ in range(self.num_layers)])[layer].append(pooled.cpu())

    def documents(self, language: str) -> int:
        chunks = self._pooled.get(language, [[]])[0]
        return sum(c.shape[0] for c in chunks)

    def responses(self, languages: Sequence[str], layer: int) -> tuple[torch.Tensor, list[int]]:
        """All pooled responses of one layer [n, I] (languages in order) and each language's row count."""
        blocks, sizes = [], []
        for language in languages:
            rows = torch.cat(self._pooled[language][layer]) if language in self._pooled else torch.empty(0)
            blocks.append(rows)
            sizes.append(rows.shape[0])
        return torch.cat([b for b in blocks if b.numel()]), sizes

    def expertise(self, languages: Sequence[str], device: torch.device | str = "cpu") -> dict[str, list[torch.Tensor]]:
        """AP of every neuron for every language: {language: [AP float64 [I] per layer]}, computed on `device`."""
        languages = list(languages)
        missing = [lang for lang in languages if self.documents(lang) == 0]
        if missing:
            raise LayermoeError(f"no documents of {', '.join(missing)} were pooled for the neuron count")
        if len(languages) < 2:
            raise LayermoeError("the neuron count needs at least two languages: a neuron is specific to one against others")
        out: dict[str, list[torch.Tensor]] = {lang: [] for lang in languages}
        for layer in range(self.num_layers):
            scores, sizes = self.responses(languages, layer)
            owner = torch.repeat_interleave(torch.arange(len(languages)), torch.tensor(sizes))  # [n]
            ap = average_precisions(scores.to(device), owner, len(languages))  # [languages, I]
            for k, lang in enumerate(languages):
                out[lang].append(ap[k])
        return out


@dataclass
class NeuronCounts:
    """Per layer: unique neurons among the languages' top-N (the allocation signal), and each language's own."""

    top_n: int  # N actually used (capped at the model's neuron count)
    unique_per_layer: list[int]
    per_language: dict[str, list[int]]
    documents: dict[str, int]  # documents pooled per language


def top_neurons(ap_by_layer: Sequence[torch.Tensor], top_n: int) -> list[tuple[int, int]]:
    """The `top_n` (layer, neuron) pairs of highest AP over all layers; ties go to the lower layer, then index."""
    flat = torch.cat([ap.double() for ap in ap_by_layer])  # [layers x I]
    keys = flat.nan_to_num(nan=float("-inf"))
    order = torch.sort(keys, descending=True, stable=True).indices[:top_n]
    width = ap_by_layer[0].shape[0]
    return [(int(i) // width, int(i) % width) for i in order]


def count_unique(ap: dict[str, list[torch.Tensor]], top_n: int, documents: dict[str, int]) -> NeuronCounts:
    """Union over languages of each language's top-N neurons, counted per layer."""
    layers = len(next(iter(ap.values())))
    total = sum(int(a.shape[0]) for a in next(iter(ap.values())))
    n = min(top_n, total)
    union: set[tuple[int, int]] = set()
    per_language = {}
    for lang, by_layer in ap.items():
        chosen = top_neurons(by_layer, n)
        union.update(chosen)
        per_language[lang] = [sum(1 for layer, _ in chosen if layer == i) for i in range(layers)]
    unique = [sum(1 for layer, _ in union if layer == i) for i in range(layers)]
    return NeuronCounts(top_n=n, unique_per_layer=unique, per_language=per_language, documents=dict(documents))
