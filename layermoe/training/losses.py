"""The auxiliary losses of the two training stages (METHOD.md section 4).

All functions take the router / classifier logits of ONE layer as `[T, E]` (T = batch*seq,
row-major over input_ids, padding included) plus a per-token mask or label, and return a
0-dim float32 tensor. The `*_over_layers` helpers average them over layers.
Everything is computed in fp32 with log_softmax; the authors' forms are options (`BALANCE_FORMS`,
`LPR_FORMS`, `LPR_TOKENS`), never the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a padding token

# How strong the load balancing is at a given alpha: `switch-normalised` (ours) counts the k routing
# slots as one token, so a balanced router scores 1 for every k; `mixtral` (transformers' Mixtral,
# MoE-LPR and the LayerMoE authors) sums the k slots, so it is exactly k times ours.
BALANCE_FORMS = ("switch-normalised", "mixtral")
# The routing prior: `nll` is the paper's -log p_0 (ours); `authors` is their code's cross-entropy
# applied to router probabilities (a softmax of a softmax), NaN-free here on a batch without old tokens.
LPR_FORMS = ("nll", "authors")
# Which earlier tokens get the routing prior: every earlier generation's (`earlier`, ours: a G1 token
# of G2's stage 2 may use expert 0 and G1's experts) or G0's only (`g0`, the authors' G2).
LPR_TOKENS = ("earlier", "g0")


def load_balancing_loss(router_logits: torch.Tensor, token_mask: torch.Tensor, top_k: int,
                        form: str = "switch-normalised") -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one MoE layer: `E * sum_e f_e * P_e`.

    router_logits: [T, E] pre-softmax; token_mask: [T] bool, True for real (non-padding) tokens.
    f_e = share of the T*k routing slots whose top-k choice is expert e (so sum_e f_e = 1,
          and for k = 1 this is exactly Switch's "fraction of tokens dispatched to e");
    P_e = mean router probability of expert e.
    Both are over real tokens only. The loss is 1 for a perfectly balanced router for any k
    (transformers' Mixtral helper sums over the k slots instead and so equals k times this).
    The routing classifier's override (old tokens -> expert 0) is not counted: this loss
    shapes the router's own choice. form="mixtral" leaves f_e unnormalised by k (k times the value).
    """
    num_experts = router_logits.shape[-1]
    logits = router_logits.float()[token_mask]  # [N, E]
    if logits.shape[0] == 0:
        return router_logits.float().sum() * 0.0
    probs = logits.softmax(dim=-1)  # [N, E]
    k = min(top_k, num_experts)
    chosen = probs.topk(k, dim=-1).indices  # [N, k]
    slots = F.one_hot(chosen, num_experts).float().sum(dim=1)  # [N, E], 0/1 per expert
    fraction_routed = slots.mean(dim=0) / k  # f_e, [E], sums to 1
    mean_prob = probs.mean(dim=0)  # P_e, [E]
    loss = num_experts * (fraction_routed * mean_prob).sum()
    return loss * k if form == "mixtral" else loss


def lpr_loss(
    router_logits: torch.Tensor,
    token_generation: torch.Tensor,
    expert_generation: torch.Tensor,
    current_generation: int,
    form: str = "nll",
    prior_for: str = "earlier",
) -> torch.Tensor:
    """Language Priors Routing loss of one MoE layer (MoE-LPR; METHOD.md section 4-5).

    A token of generation g < current may use the experts of generations <= g; its loss is
    `-log sum_{allowed e} p_e` with p the router softmax. For g = 0 the only allowed expert
    is expert 0 and this is the paper's `-log p_0`. Tokens of the current generation and
    padding (generation IGNORE) contribute nothing; with no such token the loss is exactly 0
    and its gradient is 0, not NaN.

    router_logits: [T, E]; token_generation: [T] long; expert_generation: [E] long (expert 0 -> 0).
    prior_for="g0": only G0's tokens count (the authors' G2). form="authors": their cross-entropy of
    the probabilities, `-log softmax(p)_allowed` instead of `-log p_allowed` (a weaker pull: the
    gradient on expert 0's logit is 7-10x smaller at p_0 = 0.1, about 2x at p_0 = 0.5).
    """
    logits = router_logits.float()
    if form == "authors":
        logits = logits.softmax(dim=-1)  # cross-entropy then takes a second softmax, as their code does
    log_probs = logits.log_softmax(dim=-1)  # [T, E]
    counted = (token_generation >= 0) & (token_generation < (1 if prior_for == "g0" else current_generation))  # [T]
    # Give uncounted tokens generation `current` so every row allows at least expert 0 and
    # the logsumexp below stays finite (a row of -inf would put NaN in the backward pass).
    generation = torch.where(counted, token_generation, torch.full_like(token_generation, current_generation))
    allowed = expert_generation.to(generation.device)[None, :] <= generation[:, None]  # [T, E]
    allowed_log_mass = log_probs.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)  # [T]
    per_token = torch.where(counted, -allowed_log_mass, torch.zeros_like(allowed_log_mass))
    return per_token.sum() / counted.sum().clamp(min=1)


def classifier_labels(token_generation: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-token targets of the routing classifier: binary old(0)/new(1) when it has 2 classes
    (G0 vs every later generation, as the authors), else the generation id. Padding stays IGNORE."""
    if num_classes == 2:
        labels = (token_generation > 0).long()
    else:
        labels = token_generation.long()
    return torch.where(token_generation >= 0, labels, torch.full_like(labels, IGNORE))


def classifier_loss(classifier_logits: torch.Tensor, token_generation: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one layer's routing classifier (Eq. 11-13's W_c) on per-token labels.

    classifier_logits: [T, C]; token_generation: [T] (IGNORE for padding). 0 if nothing is labelled.
    """
    labels = classifier_labels(token_generation, classifier_logits.shape[-1])
    if not bool((labels != IGNORE).any()):
        return classifier_logits.float().sum() * 0.0
    return F.cross_entropy(classifier_logits.float(), labels, ignore_index=IGNORE)


def _mean(values: list[torch.Tensor], like: torch.Tensor | None) -> torch.Tensor:
    if not values:
        device = like.device if like is not None else None
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(values).mean()


def _first(logits_by_layer: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
    return next(iter(logits_by_layer.values()), None)


def load_balancing_over_layers(
    router_logits: Mapping[int, torch.Tensor], token_mask: torch.Tensor, top_k: int, form: str = "switch-normalised"
) -> torch.Tensor:
    """Mean over MoE layers of `load_balancing_loss`; a layer with a single expert is skipped."""
    losses = [load_balancing_loss(lg, token_mask, top_k, form) for lg in router_logits.values() if lg.shape[-1] > 1]
    return _mean(losses, _first(router_logits))


def lpr_over_layers(
    router_logits: Mapping[int, torch.Tensor],
    token_generation: torch.Tensor,
    expert_generation: Mapping[int, torch.Tensor | Sequence[int]],
    current_generation: int,
    form: str = "nll",
    prior_for: str = "earlier",
) -> torch.Tensor:
    """Mean over MoE layers of `lpr_loss` (averaged over the layer's counted tokens first)."""
    losses = []
    for layer, logits in router_logits.items():
        gens = torch.as_tensor(expert_generation[layer], dtype=torch.long, device=logits.device)
        losses.append(lpr_loss(logits, token_generation, gens, current_generation, form, prior_for))
    return _mean(losses, _first(router_logits))


def classifier_over_layers(classifier_logits: Mapping[int, torch.Tensor], token_generation: torch.Tensor) -> torch.Tensor:
    """Mean over classifier layers of `classifier_loss`; 0 for a model without classifiers."""
    losses = [classifier_loss(lg, token_generation) for lg in classifier_logits.values()]
    return _mean(losses, _first(classifier_logits))
