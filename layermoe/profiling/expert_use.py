"""Which existing expert each language's tokens are routed to, read in the profile's forward pass.

`extend --expert-init routed` starts a layer's new experts as copies of the existing expert the
new languages' tokens use most, instead of expert 0 (in the spirit of DMoE, Findings ACL 2025,
which copies the expert that fits a new language best). "Use" is the routing mass: the sum over
the language's counted tokens of the weight the EFFECTIVE routing gives each expert (routing
classifier applied: a token classified old puts weight 1 on expert 0; otherwise its top-k
weights, which sum to 1). A dense layer has expert 0 alone, which gets every token's weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from layermoe.core.errors import LayermoeError


class RoutingMass:
    """Per language and layer, the routing weight summed per expert (float64 on the CPU)."""

    def __init__(self, experts_per_layer: Sequence[int]):
        self.experts_per_layer = list(experts_per_layer)
        self._mass: dict[str, list[torch.Tensor]] = {}

    def _row(self, language: str, layer: int) -> torch.Tensor:
        if language not in self._mass:
            self._mass[language] = [torch.zeros(n, dtype=torch.float64) for n in self.experts_per_layer]
        return self._mass[language][layer]

    def add_dense(self, language: str, layer: int, mask: torch.Tensor) -> None:
        self._row(language, layer)[0] += float(mask.sum())

    def add_routed(self, language: str, layer: int, block, hsa: torch.Tensor, mask: torch.Tensor) -> None:
        """Route hsa [B, T, H] with the MoE block's own effective routing; count the masked tokens."""
        (token_idx, expert_idx, weight), _, _ = block.route(hsa)  # [P] each, tokens in row-major order
        keep = mask.reshape(-1).to(token_idx.device)[token_idx]
        mass = torch.zeros(block.num_experts, dtype=torch.float64, device=weight.device)
        mass.index_add_(0, expert_idx[keep], weight[keep].double())
        self._row(language, layer).add_(mass.cpu())

    def as_lists(self) -> dict[str, list[list[float]]]:
        return {lang: [row.tolist() for row in rows] for lang, rows in self._mass.items()}


def most_routed_experts(routing_mass: Mapping[str, Sequence[Sequence[float]]], languages: Sequence[str]) -> list[int]:
    """Per layer, the expert with the largest routing mass summed over `languages` (ties: lower index)."""
    missing = [lang for lang in languages if lang not in routing_mass]
    if missing:
        raise LayermoeError(f"the profile has no routing record for {', '.join(missing)} (an older layermoe made it): "
                            "redo it with `layermoe profile --force`")
    layers = len(routing_mass[languages[0]])
    sources = []
    for layer in range(layers):
        total = torch.tensor([routing_mass[lang][layer] for lang in languages], dtype=torch.float64).sum(0)  # [E]
        best = total.max()
        sources.append(int((total == best).nonzero()[0]))
    return sources
