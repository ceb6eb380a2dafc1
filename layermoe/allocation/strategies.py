"""How many experts each layer gets (Eq. 10), the baselines, and which layers get a classifier.

Counts include expert 0 (the base FFN): a layer with 1 expert stays dense, and the budget
delta is the sum over layers, e.g. 72 over 24 layers = 24 original + 48 new experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layermoe.core.errors import LayermoeError

STRATEGIES = ("layerwise", "neuron", "uniform", "random")  # what --strategy chooses
MANUAL = "manual"  # the counts given by hand (--experts-per-layer): recorded as this strategy
ROUNDINGS = ("exact", "ceil")
NEURON_MAPPINGS = ("proportional", "linear")
NEURON_LINEAR_DEFAULTS = (1, 6)  # the authors' code: --min_experts 1 --max_experts 6
CLASSIFIER_FRACTION_TENTHS = 3  # default K = round(0.3 x layers): 7 of 24 as in the paper
# Experts in one layer (expert 0 included) unless --max-per-layer says otherwise: 8x the paper's
# largest lifelong total (10), far past any useful setting, and small enough that a mistyped
# budget (1e12) is refused here instead of asking `expand` for petabytes.
DEFAULT_MAX_PER_LAYER = 64
CEIL_TOLERANCE = 1e-9  # a share within this of an integer is that integer (float noise is not a new expert)


@dataclass(frozen=True)
class Allocation:
    """Experts per layer (expert 0 included) and by how much their sum exceeds the budget.

    overshoot is 0 for every strategy except rounding="ceil", where literal Eq. 10 may give more.
    """

    experts_per_layer: list[int]
    overshoot: int = 0

    @property
    def total(self) -> int:
        return sum(self.experts_per_layer)


def validate_budget(
    num_layers: int,
    budget: int,
    max_per_layer: int | None = None,
    *,
    k: int | None = None,
    strategy: str | None = None,
) -> None:
    """Raise LayermoeError (one line) unless these settings can give a valid allocation."""
    if strategy is not None and strategy not in STRATEGIES and strategy != MANUAL:
        raise LayermoeError(f"unknown allocation strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if num_layers < 1:
        raise LayermoeError(f"the model has {num_layers} layers: need at least 1")
    if budget < num_layers:
        raise LayermoeError(
            f"expert budget {budget} is smaller than the {num_layers} layers: every layer keeps expert 0, "
            f"so the budget must be at least {num_layers}"
        )
    if max_per_layer is not None and max_per_layer < 1:
        raise LayermoeError(f"max experts per layer must be at least 1, got {max_per_layer}")
    cap = DEFAULT_MAX_PER_LAYER if max_per_layer is None else max_per_layer
    if budget > num_layers * cap:
        raise LayermoeError(
            f"expert budget {budget} exceeds {num_layers} layers x {cap} experts per layer "
            f"= {num_layers * cap}: lower the budget or raise the per-layer maximum"
            + (" (--max-per-layer; the default is {})".format(DEFAULT_MAX_PER_LAYER) if max_per_layer is None else "")
        )
    if k is not None and not 0 <= k <= num_layers:
        raise LayermoeError(f"classifier layers k={k} is outside 0..{num_layers} (the model has {num_layers} layers)")


def _check_similarity(similarity: Sequence[float]) -> np.ndarray:
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise LayermoeError("the similarity must be one number per layer")
    for i, x in enumerate(s):
        if not math.isfinite(x) or x <= 0:
            # 1/S^i is meaningless for S^i <= 0; real models give positive HSA cosines (about 0.2-0.9).
            raise LayermoeError(
                f"layer {i} has similarity {x:.4g}, but Eq. 10 needs every similarity > 0: "
                "profile with more tokens or another model, or use the uniform strategy"
            )
    return s


def eq10_shares(similarity: Sequence[float], budget: int) -> np.ndarray:
    """The real-valued Eq. 10 shares (1/S^i) / sum_j (1/S^j) x delta, before rounding."""
    inv = 1.0 / _check_similarity(similarity)
    return inv / inv.sum() * budget


def eq10_ceil(similarity: Sequence[float], budget: int) -> list[int]:
    """Eq. 10 literally: N^i = ceil( (1/S^i) / sum_j (1/S^j) x delta ). The sum may exceed delta.

    Shares within CEIL_TOLERANCE above an integer count as that integer, so float noise on an
    exact share (e.g. 3.0000000000000004) does not add an expert.
    """
    return [max(1, math.ceil(q - CEIL_TOLERANCE)) for q in eq10_shares(similarity, budget)]


def _clamped_shares(weights: np.ndarray, budget: int, cap: int) -> np.ndarray:
    """c_i = clamp(t w_i, 1, cap) with the t for which sum c_i = budget (water filling).

    sum_i clamp(t w_i, 1, cap) is continuous and non-decreasing in t, linear between the
    breakpoints t = 1/w_i and t = cap/w_i, so we find the segment holding `budget` and solve.
    A weight of 0 stays at 1 for every t.
    """
    n = len(weights)
    if budget <= n:
        return np.ones(n)
    if budget >= n * cap:
        return np.full(n, float(cap))

    def total(t: float) -> float:
        return float(np.clip(t * weights, 1, cap).sum())

    positive = weights[weights > 0]
    points = sorted(set((1.0 / positive).tolist() + (cap / positive).tolist()))
    lo = points[0]
    for hi in points:
        if total(hi) >= budget:
            break
        lo = hi
    # On [lo, hi] the free layers are those with 1 < t w_i < cap: sum = fixed + t x free_weight.
    mid = (lo + hi) / 2
    free = (mid * weights > 1) & (mid * weights < cap)
    fixed = float(np.where(mid * weights <= 1, 1.0, 0.0).sum() + np.where(mid * weights >= cap, cap, 0.0).sum())
    t = (budget - fixed) / weights[free].sum() if free.any() else hi
    return np.clip(t * weights, 1, cap)


def allocate_layerwise(
    similarity: Sequence[float],
    budget: int,
    rounding: str = "exact",
    max_per_layer: int | None = None,
) -> Allocation:
    """Experts per layer from the layer similarities S^i (Eq. 10): less similar, more experts.

    rounding="exact" (default): sum exactly `budget`, every layer >= 1 and <= max_per_layer,
    Eq. 10's order kept (a layer never gets more experts than a layer of lower similarity).
    The Eq. 10 shares are clamped to [1, max] with the total kept at the budget, then rounded by
    largest remainder; ties go to the lower similarity, then the lower layer index.
    rounding="ceil": literal Eq. 10 (`eq10_ceil`); `overshoot` says how far the sum exceeds
    the budget. A layer over max_per_layer is an error there (use exact rounding).
    """
    if rounding not in ROUNDINGS:
        raise LayermoeError(f"unknown rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    s = _check_similarity(similarity)
    validate_budget(len(s), budget, max_per_layer)
    if rounding == "ceil":
        counts = eq10_ceil(s, budget)
        if max_per_layer is not None and max(counts) > max_per_layer:
            i = int(np.argmax(counts))
            raise LayermoeError(
                f"literal Eq. 10 gives layer {i} {counts[i]} experts, over the maximum {max_per_layer}: "
                "use exact rounding or raise the maximum"
            )
        return Allocation(counts, max(0, sum(counts) - budget))

    return Allocation(round_exact(1.0 / s, budget, max_per_layer), 0)


def round_exact(weights: Sequence[float] | np.ndarray, budget: int, max_per_layer: int | None = None) -> list[int]:
    """Integer counts for the shares w_i / sum_j w_j x budget: sum exactly `budget`, each in [1, max].

    The shares are clamped to [1, max] with the total kept at the budget (water filling), then
    rounded by largest remainder; ties go to the larger weight, then the lower layer index, so
    a layer never gets fewer experts than a layer of smaller weight. Eq. 10 uses w_i = 1/S^i.
    """
    w = np.asarray(weights, dtype=np.float64)
    cap = max_per_layer if max_per_layer is not None else min(DEFAULT_MAX_PER_LAYER, budget - len(w) + 1)
    shares = _clamped_shares(w, budget, cap)
    floors = np.floor(shares).astype(int)
    remainder = budget - int(floors.sum())
    # Largest fractional part first; then larger weight; then lower index.
    ranked = sorted(
        (i for i in range(len(w)) if floors[i] < cap),
        key=lambda i: (-(shares[i] - floors[i]), -w[i], i),
    )
    counts = floors.copy()
    for i in ranked[:remainder]:
        counts[i] += 1
    assert counts.sum() == budget and counts.min() >= 1 and counts.max() <= cap
    return [int(c) for c in counts]


def _check_neuron_counts(neuron_counts: Sequence[int]) -> np.ndarray:
    c = np.asarray(neuron_counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise LayermoeError("the neuron counts must be one number per layer")
    if (c < 0).any() or not np.isfinite(c).all():
        raise LayermoeError("a neuron count is negative or not a number: profile again")
    if not (c > 0).any():
        raise LayermoeError("no layer has language-specific neurons in the profile: profile with more tokens, "
                            "or use the layerwise strategy")
    return c


def allocate_neuron(neuron_counts: Sequence[int], budget: int, max_per_layer: int | None = None) -> Allocation:
    """NeuronMoE, budget-bound: N^i proportional to the unique language-specific neurons of layer i.

    The shares c_i / sum_j c_j x delta are rounded by `round_exact` (the rounding of Eq. 10): the
    sum is delta, every layer has >= 1 expert (a layer without such neurons stays dense unless
    the budget forces more), and more neurons never means fewer experts.
    """
    c = _check_neuron_counts(neuron_counts)
    validate_budget(len(c), budget, max_per_layer)
    return Allocation(round_exact(c, budget, max_per_layer), 0)


def validate_linear_range(min_experts: int, max_experts: int) -> None:
    if min_experts < 1:
        raise LayermoeError(f"--min-experts must be at least 1 (expert 0 is always there), got {min_experts}")
    if max_experts < min_experts:
        raise LayermoeError(f"--max-experts {max_experts} is below --min-experts {min_experts}")


def neuron_linear_mapping(neuron_counts: Sequence[int], min_experts: int = NEURON_LINEAR_DEFAULTS[0],
                          max_experts: int = NEURON_LINEAR_DEFAULTS[1]) -> Allocation:
    """The authors' mapping (`determine_expert_numbers` in NeuronMoE's analyze_neuron_distribution.py).

    With c_min the smallest non-zero count and c_max the largest:
        N^i = min + floor( (c_i - c_min) / (c_max - c_min) x (max - min) ),   N^i = min where c_i = 0
    (every layer gets min when c_max = c_min). Not budget-bound: the total is what it is. We take
    the floor of the exact rational value (their float code can land a hair below an integer).
    """
    validate_linear_range(min_experts, max_experts)
    c = [int(x) for x in _check_neuron_counts(neuron_counts)]
    c_max, c_min = max(c), min(x for x in c if x > 0)
    span, steps = c_max - c_min, max_experts - min_experts
    counts = [min_experts if x == 0 or span == 0 else min_experts + (x - c_min) * steps // span for x in c]
    return Allocation(counts, 0)


def allocate_uniform(num_layers: int, budget: int) -> Allocation:
    """MoE-LPR's baseline: the same count in every layer; a remainder r goes to r evenly spaced layers."""
    validate_budget(num_layers, budget)
    base, extra = divmod(budget, num_layers)
    counts = [base] * num_layers
    for j in range(extra):
        counts[(2 * j + 1) * num_layers // (2 * extra)] += 1  # centre of the j-th of `extra` equal stretches
    return Allocation(counts, 0)


def allocate_random(num_layers: int, budget: int, seed: int, max_per_layer: int | None = None) -> Allocation:
    """Random counts with the same total (ablation baseline): each layer >= 1 and <= max, seeded."""
    validate_budget(num_layers, budget, max_per_layer)
    cap = max_per_layer if max_per_layer is not None else min(DEFAULT_MAX_PER_LAYER, budget)
    rng = np.random.default_rng(seed)
    counts = np.ones(num_layers, dtype=int)
    for _ in range(budget - num_layers):  # one expert at a time to a random layer with room
        room = np.flatnonzero(counts < cap)
        counts[rng.choice(room)] += 1
    return Allocation([int(c) for c in counts], 0)


def allocate(
    strategy: str,
    num_layers: int,
    budget: int | None,
    similarity: Sequence[float] | None = None,
    *,
    rounding: str = "exact",
    max_per_layer: int | None = None,
    seed: int = 0,
    neuron_counts: Sequence[int] | None = None,
    neuron_mapping: str = "proportional",
    min_experts: int = NEURON_LINEAR_DEFAULTS[0],
    max_experts: int = NEURON_LINEAR_DEFAULTS[1],
) -> Allocation:
    """Dispatch to the allocation `strategy` (one of STRATEGIES).

    `budget` is None only for the neuron strategy's linear mapping, which is not budget-bound.
    """
    if strategy == "neuron":
        if neuron_mapping not in NEURON_MAPPINGS:
            raise LayermoeError(f"unknown neuron mapping {neuron_mapping!r}: choose one of {', '.join(NEURON_MAPPINGS)}")
        if neuron_counts is None:
            raise LayermoeError("the neuron strategy needs the profile's neuron counts: run the profile step first")
        if len(neuron_counts) != num_layers:
            raise LayermoeError(f"got {len(neuron_counts)} neuron counts for a model with {num_layers} layers: profile this model again")
        if neuron_mapping == "linear":
            return neuron_linear_mapping(neuron_counts, min_experts, max_experts)
        return allocate_neuron(neuron_counts, budget, max_per_layer)
    validate_budget(num_layers, budget, max_per_layer, strategy=strategy)
    if strategy == "layerwise":
        if similarity is None:
            raise LayermoeError("the layerwise strategy needs layer similarities: run the profile step first")
        if len(similarity) != num_layers:
            raise LayermoeError(f"got {len(similarity)} layer similarities for a model with {num_layers} layers: profile this model again")
        return allocate_layerwise(similarity, budget, rounding=rounding, max_per_layer=max_per_layer)
    if strategy == "manual":
        raise LayermoeError("the manual strategy takes its counts from --experts-per-layer")
    if strategy == "uniform":  # budget <= layers x max (checked above) keeps every count <= max
        return allocate_uniform(num_layers, budget)
    return allocate_random(num_layers, budget, seed, max_per_layer)


def parse_layer_list(value: str | Sequence[int] | None, what: str) -> list[int] | None:
    """"5,4,3" / a YAML list / a file holding either (commas or whitespace) -> [5, 4, 3]; None stays None.

    `what` names the option in messages (e.g. "--experts-per-layer")."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
        path = Path(value).expanduser()  # a file keeps a long list readable
        if ("," not in value and not value.strip().isdigit()) and path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise LayermoeError(f"{what} {value}: cannot read it ({e})") from None
        if text.strip().lower() in ("", "none"):
            return []
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise LayermoeError(f"{what} takes whole numbers separated by commas (or a file of them), not {value!r}") from None
    return [int(v) for v in value]


def allocate_manual(experts_per_layer: Sequence[int], num_layers: int, max_per_layer: int | None = None) -> Allocation:
    """The per-layer totals as given (expert 0 included): e.g. the authors' published lists."""
    counts = [int(n) for n in experts_per_layer]
    if len(counts) != num_layers:
        raise LayermoeError(f"--experts-per-layer has {len(counts)} counts but the model has {num_layers} layers: "
                            "give one total per layer, expert 0 included")
    low = [i for i, n in enumerate(counts) if n < 1]
    if low:
        raise LayermoeError(f"--experts-per-layer gives layer {low[0]} {counts[low[0]]} experts: every layer keeps "
                            "expert 0, so each total is at least 1")
    cap = DEFAULT_MAX_PER_LAYER if max_per_layer is None else max_per_layer
    high = [i for i, n in enumerate(counts) if n > cap]
    if high:
        raise LayermoeError(f"--experts-per-layer gives layer {high[0]} {counts[high[0]]} experts, over the "
                            f"{cap} per layer allowed (--max-per-layer)")
    return Allocation(counts, 0)


def check_classifier_placement(layers: Sequence[int], moe_after: Sequence[int]) -> list[int]:
    """Classifier layers given by hand (`--classifier-at`): real layers, each a MoE layer of the model built."""
    chosen = sorted(set(int(i) for i in layers))
    outside = [i for i in chosen if not 0 <= i < len(moe_after)]
    if outside:
        raise LayermoeError(f"--classifier-at {outside[0]}: the model has layers 0..{len(moe_after) - 1}")
    dense = [i for i in chosen if moe_after[i] <= 1]
    if dense:
        raise LayermoeError(f"--classifier-at {dense[0]}: layer {dense[0]} gets no new expert (it stays dense), so a "
                            "routing classifier there would decide nothing: put classifiers on MoE layers")
    return chosen


def default_classifier_k(num_layers: int) -> int:
    """round(0.3 x layers), halves rounded up: 7 of 24 layers as in the paper."""
    return (CLASSIFIER_FRACTION_TENTHS * num_layers + 5) // 10


def classifier_layers(similarity: Sequence[float], k: int | None = None,
                      experts_per_layer: Sequence[int] | None = None) -> list[int]:
    """The K layers with the highest S^i (most shared with the old languages), sorted by index.

    Default K = `default_classifier_k`. Equal similarities go to the lower index. Given
    `experts_per_layer`, only layers with new experts are candidates: a dense layer has
    nothing to route, so a classifier there would do nothing (K is then capped by their count).
    """
    s = np.asarray(similarity, dtype=np.float64)
    k = default_classifier_k(len(s)) if k is None else k
    validate_budget(len(s), len(s), k=k)
    candidates = range(len(s)) if experts_per_layer is None else [i for i, n in enumerate(experts_per_layer) if n > 1]
    chosen = sorted(candidates, key=lambda i: (-s[i], i))[:k]
    return sorted(chosen)


def new_parameter_count(
    experts_per_layer: Sequence[int],
    params_per_expert: int,
    hidden_size: int,
    classifier_layers: Sequence[int] | int = (),
) -> int:
    """Parameters added to the dense model: the new experts, the routers and the classifiers.

    A layer with N > 1 experts gets N - 1 new FFNs and a router Linear(hidden -> N, no bias);
    a layer with 1 expert stays dense. Each classifier is W_c in R^{hidden x 2} (Eq. 11).
    """
    n_classifiers = classifier_layers if isinstance(classifier_layers, int) else len(classifier_layers)
    experts = sum(n - 1 for n in experts_per_layer) * params_per_expert
    routers = sum(hidden_size * n for n in experts_per_layer if n > 1)
    return experts + routers + n_classifiers * hidden_size * 2
