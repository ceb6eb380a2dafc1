"""Expert allocation (Eq. 10), baselines, classifier layers and parameter counts."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layermoe.allocation.strategies import (
    CEIL_TOLERANCE,
    allocate,
    allocate_layerwise,
    allocate_neuron,
    allocate_random,
    allocate_uniform,
    classifier_layers,
    default_classifier_k,
    eq10_ceil,
    neuron_linear_mapping,
    new_parameter_count,
    round_exact,
    validate_budget,
)
from layermoe.core.errors import LayermoeError

# Qwen1.5-1.8B, G1 (el, hu, tr), published per-layer totals (expert 0 included).
PUBLISHED_G1 = [5, 4, 3, 5, 4, 3, 2, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3]

similarities = st.lists(st.floats(0.05, 1.0, allow_nan=False), min_size=1, max_size=32)


@st.composite
def problems(draw):
    s = draw(similarities)
    n = len(s)
    cap = draw(st.one_of(st.none(), st.integers(1, 12)))
    top = n * cap if cap is not None else 6 * n
    return s, draw(st.integers(n, top)), cap


def literal_eq10(s, budget):
    """Eq. 10 in exact rational arithmetic, with the documented tolerance for float noise."""
    inv = [1 / Fraction(x) for x in s]
    total = sum(inv)
    return [max(1, math.ceil(inv_i / total * budget - Fraction(CEIL_TOLERANCE))) for inv_i in inv]


@settings(max_examples=300, deadline=None)
@given(problems())
def test_exact_rounding_properties(problem):
    s, budget, cap = problem
    counts = allocate_layerwise(s, budget, max_per_layer=cap).experts_per_layer
    assert sum(counts) == budget
    assert min(counts) >= 1
    if cap is not None:
        assert max(counts) <= cap
    for a in range(len(s)):
        for b in range(len(s)):
            if s[a] > s[b]:  # more similar never gets more experts
                assert counts[a] <= counts[b], (a, b)


@settings(max_examples=300, deadline=None)
@given(similarities, st.integers(1, 63))  # within the default per-layer cap of 64
def test_exact_rounding_is_close_to_eq10_without_floor(s, extra):
    """When no share is pushed up to 1, every count is its Eq. 10 share rounded down or up."""
    budget = len(s) + extra
    inv = [1 / x for x in s]
    shares = [v / sum(inv) * budget for v in inv]
    counts = allocate_layerwise(s, budget).experts_per_layer
    if min(shares) >= 1:
        assert all(math.floor(q) <= c <= math.floor(q) + 1 for q, c in zip(shares, counts))
        assert all(abs(q - c) < 1 for q, c in zip(shares, counts))


@settings(max_examples=300, deadline=None)
@given(similarities, st.integers(0, 63))
def test_ceil_is_literal_eq10(s, extra):
    budget = len(s) + extra
    allocation = allocate_layerwise(s, budget, rounding="ceil")
    assert allocation.experts_per_layer == literal_eq10(s, budget)
    assert allocation.overshoot == max(0, sum(allocation.experts_per_layer) - budget)
    assert eq10_ceil(s, budget) == allocation.experts_per_layer


def test_published_qwen_totals():
    """S^i proportional to 1/N^i makes the Eq. 10 shares exactly N^i (delta = 72).

    Exact rounding reproduces the published totals, as does literal ceil here because the
    shares are integers. Scaling S changes nothing (Eq. 10 is scale free). Perturbing S by 1%
    leaves exact rounding on the published totals while literal ceil overshoots, which is why
    the authors had to tune delta by hand.
    """
    assert sum(PUBLISHED_G1) == 72
    s = [0.6 / n for n in PUBLISHED_G1]
    assert allocate_layerwise(s, 72).experts_per_layer == PUBLISHED_G1
    assert allocate_layerwise(s, 72, rounding="ceil").experts_per_layer == PUBLISHED_G1
    wobble = [x * (1 + 0.01 * ((-1) ** i)) for i, x in enumerate(s)]
    assert allocate_layerwise(wobble, 72).experts_per_layer == PUBLISHED_G1
    ceil = allocate_layerwise(wobble, 72, rounding="ceil")
    assert ceil.experts_per_layer == [n + (i % 2) for i, n in enumerate(PUBLISHED_G1)]
    assert (ceil.total, ceil.overshoot) == (84, 12)
    # The same budget spread uniformly is MoE-LPR's 3 experts x 24 layers.
    assert allocate_uniform(24, 72).experts_per_layer == [3] * 24


def test_exact_rounding_ties_and_cap():
    # Equal similarities, one expert left over: the lower index gets it.
    assert allocate_layerwise([0.5, 0.5, 0.5], 4).experts_per_layer == [2, 1, 1]
    # Equal fractional parts: the lower similarity wins.
    assert allocate_layerwise([0.5, 0.4, 0.5, 0.4], 6).experts_per_layer == [1, 2, 1, 2]
    # The cap moves the surplus to the next least similar layers.
    assert allocate_layerwise([0.1, 0.5, 0.5, 0.9], 10, max_per_layer=3).experts_per_layer == [3, 3, 3, 1]
    # budget == layers: all dense; budget == layers x cap: all full.
    assert allocate_layerwise([0.2, 0.9], 2).experts_per_layer == [1, 1]
    assert allocate_layerwise([0.2, 0.9], 8, max_per_layer=4).experts_per_layer == [4, 4]


@pytest.mark.parametrize("bad", [0.0, -0.2, float("nan"), float("inf")])
def test_nonpositive_similarity_is_an_error(bad):
    with pytest.raises(LayermoeError) as err:
        allocate_layerwise([0.5, bad, 0.3], 6)
    assert str(err.value) == (
        f"layer 1 has similarity {bad:.4g}, but Eq. 10 needs every similarity > 0: "
        "profile with more tokens or another model, or use the uniform strategy"
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(0, 63))
def test_uniform(layers, extra):
    budget = layers + extra
    counts = allocate_uniform(layers, budget).experts_per_layer
    assert sum(counts) == budget
    assert max(counts) - min(counts) <= 1
    assert allocate_uniform(layers, budget).experts_per_layer == counts


def test_uniform_spreads_remainder_evenly():
    assert allocate_uniform(24, 74).experts_per_layer == [3] * 6 + [4] + [3] * 11 + [4] + [3] * 5
    assert allocate_uniform(4, 6).experts_per_layer == [1, 2, 1, 2]
    assert allocate_uniform(3, 5).experts_per_layer == [2, 1, 2]


@settings(max_examples=200, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_random(problem, seed):
    s, budget, cap = problem
    counts = allocate_random(len(s), budget, seed, max_per_layer=cap).experts_per_layer
    assert sum(counts) == budget and min(counts) >= 1
    assert cap is None or max(counts) <= cap
    assert allocate_random(len(s), budget, seed, max_per_layer=cap).experts_per_layer == counts


def test_random_depends_on_seed():
    runs = {tuple(allocate_random(24, 72, seed).experts_per_layer) for seed in range(5)}
    assert len(runs) == 5


def test_allocate_dispatch():
    s = [0.6 / n for n in PUBLISHED_G1]
    assert allocate("layerwise", 24, 72, s).experts_per_layer == PUBLISHED_G1
    assert allocate("uniform", 24, 72).experts_per_layer == [3] * 24
    assert allocate("random", 24, 72, seed=7) == allocate_random(24, 72, 7)


def test_classifier_layers():
    s = [0.6 / n for n in PUBLISHED_G1]
    assert default_classifier_k(24) == 7 and default_classifier_k(5) == 2 and default_classifier_k(1) == 0
    # The 9 layers with 2 experts are the most similar; ties go to the lower index.
    assert classifier_layers(s) == [6, 9, 10, 11, 12, 13, 14]
    assert classifier_layers(s, k=2) == [6, 9]
    assert classifier_layers([0.1, 0.9, 0.5], k=3) == [0, 1, 2]
    assert classifier_layers(s, k=0) == []


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: validate_budget(24, 23), "expert budget 23 is smaller than the 24 layers: every layer keeps expert 0, so the budget must be at least 24"),
        (lambda: validate_budget(24, 97, 4), "expert budget 97 exceeds 24 layers x 4 experts per layer = 96: lower the budget or raise the per-layer maximum"),
        (lambda: validate_budget(24, 72, k=25), "classifier layers k=25 is outside 0..24 (the model has 24 layers)"),
        (lambda: validate_budget(24, 72, k=-1), "classifier layers k=-1 is outside 0..24 (the model has 24 layers)"),
        (lambda: validate_budget(24, 72, strategy="greedy"), "unknown allocation strategy 'greedy': choose one of layerwise, neuron, uniform, random"),
        (lambda: validate_budget(24, 72, 0), "max experts per layer must be at least 1, got 0"),
        (lambda: classifier_layers([0.5] * 3, k=4), "classifier layers k=4 is outside 0..3 (the model has 3 layers)"),
        (lambda: allocate_layerwise([0.5] * 3, 2), "expert budget 2 is smaller than the 3 layers: every layer keeps expert 0, so the budget must be at least 3"),
        (lambda: allocate_layerwise([0.5] * 3, 6, rounding="floor"), "unknown rounding 'floor': choose one of exact, ceil"),
        (lambda: allocate_layerwise([0.1, 0.9], 6, rounding="ceil", max_per_layer=4), "literal Eq. 10 gives layer 0 6 experts, over the maximum 4: use exact rounding or raise the maximum"),
        (lambda: allocate_uniform(3, 2), "expert budget 2 is smaller than the 3 layers: every layer keeps expert 0, so the budget must be at least 3"),
        (lambda: allocate_random(3, 13, 0, max_per_layer=4), "expert budget 13 exceeds 3 layers x 4 experts per layer = 12: lower the budget or raise the per-layer maximum"),
        (lambda: allocate("layerwise", 3, 6), "the layerwise strategy needs layer similarities: run the profile step first"),
        (lambda: allocate("layerwise", 3, 6, [0.5, 0.5]), "got 2 layer similarities for a model with 3 layers: profile this model again"),
        (lambda: allocate("uniform", 3, 10, max_per_layer=3), "expert budget 10 exceeds 3 layers x 3 experts per layer = 9: lower the budget or raise the per-layer maximum"),
        (lambda: allocate("other", 3, 6), "unknown allocation strategy 'other': choose one of layerwise, neuron, uniform, random"),
        (lambda: allocate_neuron([0, 0, 0], 6), "no layer has language-specific neurons in the profile: profile with more tokens, or use the layerwise strategy"),
        (lambda: allocate("neuron", 3, 6, neuron_counts=[4, 5]), "got 2 neuron counts for a model with 3 layers: profile this model again"),
        (lambda: allocate("neuron", 3, 6, neuron_counts=[4, 5, 6], neuron_mapping="log"), "unknown neuron mapping 'log': choose one of proportional, linear"),
        (lambda: neuron_linear_mapping([4, 5], 2, 1), "--max-experts 1 is below --min-experts 2"),
    ],
)
def test_error_messages(call, message):
    with pytest.raises(LayermoeError) as err:
        call()
    assert str(err.value) == message


def test_new_parameter_count():
    # 2 layers with 3 and 1 experts: 2 new FFNs, one router (hidden x 3), one classifier (hidden x 2).
    assert new_parameter_count([3, 1], params_per_expert=1000, hidden_size=10, classifier_layers=[1]) == 2000 + 30 + 20
    assert new_parameter_count([3, 1], 1000, 10, classifier_layers=1) == 2050
    assert new_parameter_count([1, 1], 1000, 10) == 0


def test_classifiers_go_only_to_layers_with_new_experts():
    from layermoe.allocation.strategies import classifier_layers

    similarity = [0.2, 0.9, 0.8, 0.3]
    assert classifier_layers(similarity, 2) == [1, 2]
    # layer 1 is the most similar but stayed dense: the next most similar MoE layers win
    assert classifier_layers(similarity, 2, experts_per_layer=[3, 1, 2, 2]) == [2, 3]
    # K is capped by the number of MoE layers
    assert classifier_layers(similarity, 3, experts_per_layer=[1, 1, 2, 1]) == [2]


def test_the_budget_is_capped_by_a_default_per_layer_maximum():
    from layermoe.allocation.strategies import DEFAULT_MAX_PER_LAYER

    with pytest.raises(LayermoeError, match=r"^expert budget 1000000000000 exceeds 24 layers x 64 experts per layer = 1536: "
                                            r"lower the budget or raise the per-layer maximum \(--max-per-layer; the default is 64\)$"):
        validate_budget(24, 10**12)
    counts = allocate_layerwise([0.1, 0.9], 2 * DEFAULT_MAX_PER_LAYER).experts_per_layer
    assert counts == [DEFAULT_MAX_PER_LAYER, DEFAULT_MAX_PER_LAYER]
    assert max(allocate_random(2, 100, 0).experts_per_layer) <= DEFAULT_MAX_PER_LAYER


# ---------------------------------------------------------------- NeuronMoE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=32).filter(any), st.data())
def test_neuron_strategy_hits_the_budget_and_keeps_the_order(counts, data):
    budget = data.draw(st.integers(len(counts), 6 * len(counts)))
    experts = allocate_neuron(counts, budget).experts_per_layer
    assert sum(experts) == budget and min(experts) >= 1
    for a in range(len(counts)):
        for b in range(len(counts)):
            if counts[a] > counts[b]:  # more language-specific neurons never get fewer experts
                assert experts[a] >= experts[b], (a, b)
    assert round_exact(counts, budget) == experts


def test_neuron_strategy_rounds_as_eq10():
    # the same rounding as Eq. 10: neuron counts c_i act as 1/S^i
    for counts, budget in (([1, 2, 4], 9), ([5, 3, 2, 8], 11), ([10, 0, 30], 7)):
        similarity = [1 / c if c else 1e9 for c in counts]
        assert allocate_neuron(counts, budget).experts_per_layer == allocate_layerwise(similarity, budget).experts_per_layer
    assert allocate_neuron([0, 10, 30, 0], 6).experts_per_layer == [1, 1, 3, 1]  # no neurons: stays dense


def test_neuron_linear_mapping_is_the_authors_formula():
    """analyze_neuron_distribution.py: min + int((c - c_min) / (c_max - c_min) x (max - min)), c_min over
    non-zero layers, zero layers at min; by hand for counts 0, 10, 55, 100, 30, 64 with min 1, max 6."""
    counts = [0, 10, 55, 100, 30, 64]
    # (55-10)/90*5 = 2.5 -> 2; (30-10)/90*5 = 1.11 -> 1; (64-10)/90*5 = 3.0 exactly -> 3
    assert neuron_linear_mapping(counts, 1, 6).experts_per_layer == [1, 1, 3, 6, 2, 4]
    assert neuron_linear_mapping(counts).experts_per_layer == [1, 1, 3, 6, 2, 4]  # defaults 1 and 6
    assert neuron_linear_mapping(counts, 2, 4).experts_per_layer == [2, 2, 3, 4, 2, 3]
    assert neuron_linear_mapping([7, 7, 0], 1, 6).experts_per_layer == [1, 1, 1]  # c_max = c_min: all at min
    allocation = allocate("neuron", 6, None, neuron_counts=counts, neuron_mapping="linear")
    assert allocation.total == 17 and allocation.overshoot == 0  # not budget-bound: the total it reaches
