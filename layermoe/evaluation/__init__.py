"""Evaluation: held-out bits per byte per language, old/new group figures, routing health.

- `windows.py`: which tokens and bytes are scored (the definition behind bpb)
- `bpb.py`: the bits-per-byte definition (LanguageEval, NLL of logits)
- `measure.py`: `measure_languages` -> bits per byte and routing counts from one forward pass;
  `evaluate_languages` -> LanguageEval per language
- `groups.py`: `group_averages`, `deltas`, `forgetting_and_gain` over plain dicts
- `routing.py`: routing counts per language, `summarise_routing` / `routing_health` -> RoutingHealth, `plot_routing`
"""

from layermoe.evaluation.bpb import LanguageEval, bits_per_byte
from layermoe.evaluation.groups import deltas, forgetting_and_gain, group_averages
from layermoe.evaluation.measure import Measurement, evaluate_languages, measure_languages
from layermoe.evaluation.routing import LanguageRouting, RoutingHealth, plot_routing, routing_health, summarise_routing

__all__ = [
    "LanguageEval",
    "LanguageRouting",
    "Measurement",
    "RoutingHealth",
    "bits_per_byte",
    "deltas",
    "evaluate_languages",
    "forgetting_and_gain",
    "group_averages",
    "measure_languages",
    "plot_routing",
    "routing_health",
    "summarise_routing",
]
