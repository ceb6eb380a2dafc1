"""Evaluation: held-out bits per byte per language, old/new group figures, routing health.

- `windows.py`: which tokens and bytes are scored (the definition behind bpb)
- `bpb.py`: `evaluate_languages` -> LanguageEval per language
- `groups.py`: `group_averages`, `deltas`, `forgetting_and_gain` over plain dicts
- `routing.py`: `routing_health` -> RoutingHealth, `plot_routing`
"""

from layermoe_cli.evaluation.bpb import LanguageEval, bits_per_byte, evaluate_languages
from layermoe_cli.evaluation.groups import deltas, forgetting_and_gain, group_averages
from layermoe_cli.evaluation.routing import RoutingHealth, plot_routing, routing_health

__all__ = [
    "LanguageEval",
    "RoutingHealth",
    "bits_per_byte",
    "deltas",
    "evaluate_languages",
    "forgetting_and_gain",
    "group_averages",
    "plot_routing",
    "routing_health",
]
