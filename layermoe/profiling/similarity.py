"""Layer-wise language similarity (Eq. 8-9), streamed over tokens.

Eq. 8 defines the similarity of languages a and b at layer i as the mean cosine over all token
pairs. Since cos(x, y) = unit(x) . unit(y), that mean is

    (1 / (n_a n_b)) sum_j sum_k unit(h_a,j) . unit(h_b,k) = mean_j unit(h_a,j) . mean_k unit(h_b,k)

so keeping one running sum of unit vectors per language and layer gives the exact value with
memory O(layers x hidden x languages), whatever the number of tokens, and one forward pass per
language instead of one per pair.

Same-language entries (the matrix diagonal) use the same formula, so they average over all
ordered pairs (j, k) *including* j = k. Eq. 9 never reads the diagonal.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from layermoe.core.errors import LayermoeError
from layermoe.profiling.expert_use import RoutingMass
from layermoe.profiling.hsa import capture_ffn_inputs, decoder_layers, token_mask, tokenizer_prepends_bos
from layermoe.profiling.neurons import NeuronAccumulator, NeuronCounts, capture_ffn_neurons, count_unique
from layermoe.profiling.settings import NEURON_DOCUMENTS, NEURON_TOP_N, PROFILE_BATCH_TOKENS, PROFILE_TOKENS

MAX_SEQUENCE_TOKENS = 1024


def _sum_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everything else sums in float64.
    return torch.float32 if device.type == "mps" else torch.float64


class SimilarityAccumulator:
    """Per language and layer: the sum of unit HSA vectors (float64) and how many were added.

    Sums and counts stay on the device of the hidden states they come from (no host sync per
    layer); `mean_unit_vectors` brings them to the CPU. A zero vector has no direction: it adds
    nothing to the sum but is counted, i.e. its cosine with anything is taken as 0.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._sums: dict[str, list[torch.Tensor | None]] = {}  # language -> per layer [hidden]
        self._counts: dict[str, list[torch.Tensor | int]] = {}  # language -> per layer count

    @property
    def languages(self) -> list[str]:
        return list(self._sums)

    def add(self, language: str, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add hidden [..., H]; with mask bool [...] only the positions where it is True."""
        if language not in self._sums:
            self._sums[language] = [None] * self.num_layers
            self._counts[language] = [0] * self.num_layers
        dtype = _sum_dtype(hidden.device)
        units = F.normalize(hidden.detach().to(dtype), dim=-1)  # [..., H]
        if mask is not None:
            mask = mask.to(hidden.device, non_blocking=True)
            units = units * mask.unsqueeze(-1).to(dtype)
            count = mask.sum()
        else:
            count = units[..., 0].numel()
        total = units.reshape(-1, units.shape[-1]).sum(0)  # [H]
        sums = self._sums[language]
        sums[layer] = total if sums[layer] is None else sums[layer] + total
        self._counts[language][layer] = self._counts[language][layer] + count

    def count(self, language: str, layer: int = 0) -> int:
        return int(self._counts[language][layer])

    def mean_unit_vectors(self, languages: Sequence[str] | None = None) -> np.ndarray:
        """Mean unit HSA vector per language and layer: float64 [n_lang, layers, hidden]."""
        languages = self.languages if languages is None else list(languages)
        out = []
        for lang in languages:
            if lang not in self._sums:
                raise LayermoeError(f"no hidden states were profiled for language {lang!r}")
            rows = []
            for layer in range(self.num_layers):
                n = int(self._counts[lang][layer])
                if n == 0 or self._sums[lang][layer] is None:
                    raise LayermoeError(f"no tokens were profiled for language {lang!r} at layer {layer}")
                rows.append(self._sums[lang][layer].double().cpu().numpy() / n)
            out.append(np.stack(rows))
        return np.stack(out)

    def matrix(self, languages: Sequence[str] | None = None) -> np.ndarray:
        return pairwise_similarity(self.mean_unit_vectors(languages))


def pairwise_similarity(mean_units: np.ndarray) -> np.ndarray:
    """Eq. 8 for every pair of languages at once: [n_lang, layers, H] -> [layers, n_lang, n_lang].

    Entry [i, a, b] = mean over all token pairs of cos(h_a, h_b) at layer i, given the mean unit
    vectors from `SimilarityAccumulator.mean_unit_vectors`.
    """
    mean_units = np.asarray(mean_units, dtype=np.float64)
    return np.einsum("alh,blh->lab", mean_units, mean_units)


def layer_scores(
    matrix: np.ndarray | Sequence, languages: Sequence[str], old: Sequence[str], new: Sequence[str]
) -> list[float]:
    """Eq. 9 as in the authors' code: S^i = (mean new-new + mean new-old) / 2 per layer.

    new-new averages the pairs a < b of new languages, new-old averages all new x old pairs;
    old-old pairs are not used. With a single new language S^i is the new-old mean alone.
    """
    m = np.asarray(matrix, dtype=np.float64)  # [layers, n_lang, n_lang]
    new_new, new_old = pair_means(m, languages, old, new)
    if len(new) == 1:
        return [float(x) for x in new_old]
    return [float(x) for x in (new_new + new_old) / 2]


def pair_means(
    matrix: np.ndarray | Sequence, languages: Sequence[str], old: Sequence[str], new: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: (mean over new-new pairs a < b, mean over new x old pairs); new-new is NaN
    with a single new language."""
    m = np.asarray(matrix, dtype=np.float64)
    languages = list(languages)
    if not new:
        raise LayermoeError("no new languages given: name at least one language to learn")
    if not old:
        raise LayermoeError("no old languages given: name at least one language the model already knows")
    overlap = sorted(set(old) & set(new))
    if overlap:
        raise LayermoeError(f"languages {', '.join(overlap)} are listed both as old and as new: list each once")
    missing = [lang for lang in (*old, *new) if lang not in languages]
    if missing:
        raise LayermoeError(f"languages {', '.join(missing)} were not profiled: profile them first")
    if m.ndim != 3 or m.shape[1:] != (len(languages), len(languages)):
        raise ValueError(f"similarity matrix of shape {m.shape} does not match {len(languages)} languages")
    ni = [languages.index(lang) for lang in new]
    oi = [languages.index(lang) for lang in old]
    new_old = m[:, ni][:, :, oi].mean(axis=(1, 2))  # [layers]
    pairs = [(a, b) for x, a in enumerate(ni) for b in ni[x + 1 :]]
    if pairs:
        new_new = np.mean([m[:, a, b] for a, b in pairs], axis=0)
    else:
        new_new = np.full(m.shape[0], np.nan)
    return new_new, new_old


@dataclass
class ProfileResult:
    """What `profile_model` measured, in plain Python types (ready for JSON / pydantic)."""

    languages: list[str]
    matrix: list[list[list[float]]]  # [layer][lang_a][lang_b], Eq. 8
    tokens_per_language: dict[str, int]
    include_bos: bool = False
    seed: int = 0
    neurons: NeuronCounts | None = None  # language-specific FFN neurons per layer (NeuronMoE), same pass
    routing_mass: dict[str, list[list[float]]] | None = None  # MoE models: per language, layer, expert

    @property
    def num_layers(self) -> int:
        return len(self.matrix)

    def scores(self, old: Sequence[str], new: Sequence[str]) -> list[float]:
        """S^i per layer (Eq. 9)."""
        return layer_scores(self.matrix, self.languages, old, new)


def sample_sequences(
    tokenizer,
    texts: Iterable[str],
    tokens: int,
    seed: int,
    max_length: int,
    language: str = "",
    include_bos: bool = False,
    document_order: str = "shuffled",
    long_documents: str = "split",
) -> list[list[int]]:
    """Token id sequences holding exactly `tokens` counted tokens (fewer if the texts run out).

    Documents are shuffled with `seed` (and the language name), or kept in the source's order
    (`document_order="file"`, the authors'), tokenized the tokenizer's usual way (BOS when it
    prepends one), taken in order until the budget is met, the last one cut short. A document
    longer than `max_length` is split into several sequences, each piece after the first with
    the BOS again when the tokenizer prepends one; or (`long_documents="truncate"`, the authors')
    cut at `max_length`, the rest dropped. BOS is not counted unless include_bos.
    """
    docs = [t for t in texts if t and t.strip()]
    if document_order == "shuffled":
        random.Random(f"{seed}/{language}").shuffle(docs)
    bos = tokenizer.bos_token_id if tokenizer_prepends_bos(tokenizer) else None
    bos_cost = 1 if include_bos else 0  # what a leading BOS costs from the budget
    sequences: list[list[int]] = []
    remaining = tokens
    chunk = 64  # tokenize a few documents at a time: the corpus may be far larger than needed
    for start in range(0, len(docs), chunk):
        if remaining <= 0:
            break
        for ids in tokenizer(docs[start : start + chunk])["input_ids"]:
            if remaining <= 0:
                break
            lead = [bos] if bos is not None and ids[:1] == [bos] else []
            body = ids[len(lead) :]
            step = max(1, max_length - len(lead))
            if long_documents == "truncate":
                body = body[:step]
            for piece_start in range(0, len(body), step):
                piece = body[piece_start : piece_start + step]
                counted = len(piece) + len(lead) * bos_cost
                if counted > remaining:
                    piece = piece[: remaining - len(lead) * bos_cost]
                    counted = remaining
                if not piece:  # only room left for a counted BOS: stop here
                    remaining = 0
                    break
                sequences.append(lead + piece)
                remaining -= counted
                if remaining <= 0:
                    break
    return sequences


def _batch_indices(sequences: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Indices of the sequences, grouped longest first so that rows x longest row <= batch_tokens (one row at least)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)  # stable: deterministic
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(sequences[current[0]]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _batches(sequences: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    """The sequences grouped as `_batch_indices` groups them."""
    return [[sequences[i] for i in batch] for batch in _batch_indices(sequences, batch_tokens)]


def _forward_kwargs(model) -> dict:
    # Only the HSA is needed: ask for the logits of one position when the model allows it.
    params = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _max_length(model, cap: int | None = None) -> int:
    """Tokens in one profiled sequence at most: `cap` (default 1,024), never past the model's positions."""
    cap = MAX_SEQUENCE_TOKENS if cap is None else cap
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or cap
    return min(cap, int(limit))


def _check_profile_arguments(texts_by_language, tokens_per_language: int, batch_tokens: int, neuron_top_n: int,
                             neuron_documents: int) -> None:
    if tokens_per_language < 1:
        raise LayermoeError(f"tokens per language must be at least 1, got {tokens_per_language}")
    if batch_tokens < 1:
        raise LayermoeError(f"batch tokens must be at least 1, got {batch_tokens}")
    if neuron_top_n < 0:
        raise LayermoeError(f"neuron top-N must be 0 (no neuron count) or more, got {neuron_top_n}")
    if neuron_top_n and neuron_documents < 1:
        raise LayermoeError(f"documents per language for the neuron count must be at least 1, got {neuron_documents}")
    if not texts_by_language:
        raise LayermoeError("no languages to profile: give text for at least one language")


def right_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) of sequences padded on the right to the longest, T."""
    width = max(len(seq) for seq in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def profile_model(
    model,
    tokenizer,
    texts_by_language: Mapping[str, Iterable[str]],
    tokens_per_language: int = PROFILE_TOKENS,
    batch_tokens: int = PROFILE_BATCH_TOKENS,
    include_bos: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    neuron_top_n: int = NEURON_TOP_N,
    neuron_documents: int = NEURON_DOCUMENTS,
    max_document_tokens: int | None = None,
    document_order: str = "shuffled",
    long_documents: str = "split",
) -> ProfileResult:
    """Run the model once over up to `tokens_per_language` sampled tokens of each language and
    return the language x language similarity matrix of every layer (Eq. 8).

    One forward pass per batch (right-padded, no grad, eval mode); the HSA is read by hooks on
    each layer's `mlp`. Padding never counts; BOS counts only with include_bos. `device` moves
    the model there first; by default inputs go to the device of the input embeddings.
    `progress(language, tokens_done, tokens_total)` is called after every batch.

    The same pass counts language-specific FFN neurons (`neurons.py`; `neuron_top_n` = 0 skips
    it, as does a single language): the first `neuron_documents` sampled sequences of each
    language are mean-pooled. On an expanded model it also records each language's routing
    mass per expert (`expert_use.py`). The authors' context (METHOD.md sec. 1 and README, "Paper
    setting vs layermoe default"): `document_order="file"`, `long_documents="truncate"`,
    `max_document_tokens=10_000`, `include_bos=True`.
    """
    _check_profile_arguments(texts_by_language, tokens_per_language, batch_tokens, neuron_top_n, neuron_documents)
    if device is not None:
        model.to(device)
    input_device = model.get_input_embeddings().weight.device
    max_length = min(_max_length(model, max_document_tokens), batch_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bos = tokenizer.bos_token_id if tokenizer_prepends_bos(tokenizer) else None
    forward_kwargs = _forward_kwargs(model)
    layers = decoder_layers(model)
    accumulator = SimilarityAccumulator(len(layers))
    languages = list(texts_by_language)
    neurons = NeuronAccumulator(len(layers), neuron_documents) if neuron_top_n and len(languages) > 1 else None
    moe_blocks = {i: layer.mlp for i, layer in enumerate(layers) if hasattr(layer.mlp, "route")}
    routing = RoutingMass([moe_blocks[i].num_experts if i in moe_blocks else 1 for i in range(len(layers))]) if moe_blocks else None
    state: dict = {}  # language, mask and neuron-sample rows of the batch being run, read by the hooks

    def on_input(layer: int, hsa: torch.Tensor) -> None:
        accumulator.add(state["language"], layer, hsa, state["mask"])
        if routing is not None:
            if layer in moe_blocks:
                routing.add_routed(state["language"], layer, moe_blocks[layer], hsa, state["mask"])
            else:
                routing.add_dense(state["language"], layer, state["mask"])

    def on_activation(layer: int, activation_of) -> None:
        rows = state["neuron_rows"]
        if rows is not None:
            neurons.add(state["language"], layer, activation_of(rows), state["mask"][rows])

    counted: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        reading_neurons = capture_ffn_neurons(model, on_activation) if neurons is not None else nullcontext()
        with torch.no_grad(), capture_ffn_inputs(model, on_input), reading_neurons:
            for language, texts in texts_by_language.items():
                sequences = sample_sequences(tokenizer, texts, tokens_per_language, seed, max_length, language, include_bos,
                                             document_order, long_documents)
                if not sequences:
                    raise LayermoeError(f"no text to profile for language {language!r}: its data is empty")
                skipped_bos = 0 if include_bos or bos is None else sum(s[0] == bos for s in sequences)
                total = sum(len(s) for s in sequences) - skipped_bos
                done = 0
                for indices in _batch_indices(sequences, batch_tokens):
                    input_ids, attention_mask = right_padded([sequences[i] for i in indices], pad_id)
                    mask = token_mask(input_ids, attention_mask, bos, include_bos)
                    # The neuron sample: the first `neuron_documents` sequences in (seeded) sample order.
                    rows = [row for row, i in enumerate(indices) if i < neuron_documents]
                    state["language"], state["mask"] = language, mask.to(input_device)
                    state["neuron_rows"] = torch.tensor(rows, device=input_device) if rows else None
                    model(input_ids=input_ids.to(input_device), attention_mask=attention_mask.to(input_device), **forward_kwargs)
                    done += int(mask.sum())
                    if progress is not None:
                        progress(language, done, total)
                counted[language] = done
    finally:
        model.train(was_training)

    matrix = accumulator.matrix(languages)
    counts = None
    if neurons is not None:
        documents = {lang: neurons.documents(lang) for lang in languages}
        counts = count_unique(neurons.expertise(languages, device=input_device), neuron_top_n, documents)
    return ProfileResult(
        languages=languages,
        matrix=matrix.tolist(),
        tokens_per_language=counted,
        include_bos=include_bos,
        seed=seed,
        neurons=counts,
        routing_mass=routing.as_lists() if routing is not None else None,
    )
