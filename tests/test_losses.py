"""Auxiliary losses of the two training stages against hand computations."""

import math

import pytest
import torch

from layermoe.training.losses import (
    IGNORE,
    classifier_labels,
    classifier_loss,
    classifier_over_layers,
    load_balancing_loss,
    load_balancing_over_layers,
    lpr_loss,
    lpr_over_layers,
)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _balance_by_hand(logits, mask, k):
    rows = [r for r, keep in zip(logits, mask) if keep]
    num_e = len(rows[0])
    probs = [_softmax(r) for r in rows]
    counts = [0] * num_e
    for p in probs:
        for e in sorted(range(num_e), key=lambda e: -p[e])[:k]:
            counts[e] += 1
    f = [c / (len(rows) * k) for c in counts]
    P = [sum(p[e] for p in probs) / len(rows) for e in range(num_e)]
    return num_e * sum(fe * pe for fe, pe in zip(f, P))


def test_balance_matches_hand_computation_with_padding_masked():
    logits = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.2, 3.0], [9.0, -9.0, 0.0], [0.3, 0.2, 0.1]]
    mask = [True, True, True, False, True]  # token 3 is padding: its extreme logits must not count
    for k in (1, 2):
        got = load_balancing_loss(torch.tensor(logits), torch.tensor(mask), top_k=k)
        assert got.item() == pytest.approx(_balance_by_hand(logits, mask, k), rel=1e-6)


def test_balance_is_one_when_perfectly_balanced_and_larger_when_collapsed():
    uniform = torch.zeros(6, 3)
    # equal logits: top-k ties break by index, so use a rotation that spreads the choices
    rot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).repeat(2, 1) * 1e-6
    assert load_balancing_loss(uniform + rot, torch.ones(6, dtype=torch.bool), top_k=1).item() == pytest.approx(1.0, abs=1e-5)
    collapsed = torch.tensor([[5.0, 0, 0]]).repeat(6, 1)
    assert load_balancing_loss(collapsed, torch.ones(6, dtype=torch.bool), top_k=1).item() > 2.5


def test_balance_over_layers_uses_each_layers_own_expert_count_and_averages():
    mask = torch.tensor([True, True, False])
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    b = torch.tensor([[1.0, 0.0, 0.5, 0.1, 0.2], [0.0, 2.0, 0.1, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0, 0.0]])
    want = (_balance_by_hand(a.tolist(), mask.tolist(), 2) + _balance_by_hand(b.tolist(), mask.tolist(), 2)) / 2
    assert load_balancing_over_layers({0: a, 3: b}, mask, top_k=2).item() == pytest.approx(want, rel=1e-6)


def test_lpr_is_minus_log_p0_on_old_tokens_only():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    token_gen = torch.tensor([0, 1, 0, IGNORE])  # two old tokens, one new, one padding
    expert_gen = torch.tensor([0, 1, 1])
    want = (-math.log(_softmax([1.0, 2.0, 0.5])[0]) - math.log(_softmax([4.0, 0.0, 0.0])[0])) / 2
    assert lpr_loss(logits, token_gen, expert_gen, current_generation=1).item() == pytest.approx(want, rel=1e-6)


def test_lpr_generalised_lets_a_token_use_experts_of_its_generation_and_older():
    logits = torch.tensor([[0.3, 1.0, 2.0, -0.5, 0.7], [1.0, 0.0, 0.0, 2.0, 2.0]])
    expert_gen = torch.tensor([0, 1, 1, 2, 2])
    token_gen = torch.tensor([1, 0])  # in generation 2: a G1 token and a G0 token
    p0, p1 = _softmax(logits[0].tolist()), _softmax(logits[1].tolist())
    want = (-math.log(p0[0] + p0[1] + p0[2]) - math.log(p1[0])) / 2
    assert lpr_loss(logits, token_gen, expert_gen, current_generation=2).item() == pytest.approx(want, rel=1e-6)
    # tokens of the current generation add nothing, whatever their routing
    only_new = torch.tensor([2, 2])
    assert lpr_loss(logits, only_new, expert_gen, current_generation=2).item() == 0.0


def test_lpr_without_old_tokens_is_exactly_zero_with_finite_zero_grads():
    logits = torch.randn(5, 4, requires_grad=True)
    token_gen = torch.tensor([1, 1, IGNORE, 1, IGNORE])
    loss = lpr_over_layers({0: logits, 2: logits * 2}, token_gen, {0: [0, 1, 1, 1], 2: [0, 1, 1, 1]}, current_generation=1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_lpr_of_all_padding_has_no_nan_grad():
    logits = torch.randn(3, 3, requires_grad=True)
    loss = lpr_loss(logits, torch.full((3,), IGNORE), torch.tensor([0, 1, 1]), current_generation=1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_lpr_is_not_a_double_softmax():
    # p_0 = 0.9 exactly: -log 0.9; a double softmax would give -log(softmax([.9,.1])[0]) ~ 0.371
    logits = torch.log(torch.tensor([[0.9, 0.1]]))
    got = lpr_loss(logits, torch.tensor([0]), torch.tensor([0, 1]), current_generation=1)
    assert got.item() == pytest.approx(-math.log(0.9), rel=1e-6)


def test_classifier_labels_binary_and_multiclass():
    gens = torch.tensor([0, 1, 2, IGNORE])
    assert classifier_labels(gens, 2).tolist() == [0, 1, 1, IGNORE]
    assert classifier_labels(gens, 3).tolist() == [0, 1, 2, IGNORE]


def test_classifier_loss_is_cross_entropy_over_labelled_tokens_and_averages_layers():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [1.0, 3.0]])
    gens = torch.tensor([0, IGNORE, 1])
    want = (-math.log(_softmax([2.0, -1.0])[0]) - math.log(_softmax([1.0, 3.0])[1])) / 2
    assert classifier_loss(logits, gens).item() == pytest.approx(want, rel=1e-6)
    assert classifier_over_layers({1: logits, 4: logits}, gens).item() == pytest.approx(want, rel=1e-6)
    assert classifier_over_layers({}, gens).item() == 0.0


def test_classifier_learns_a_separable_toy():
    torch.manual_seed(0)
    old = torch.randn(64, 8) + torch.tensor([2.0] + [0.0] * 7)
    new = torch.randn(64, 8) - torch.tensor([2.0] + [0.0] * 7)
    x = torch.cat([old, new])
    gens = torch.cat([torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)])
    w = torch.nn.Linear(8, 2, bias=False)
    opt = torch.optim.SGD(w.parameters(), lr=0.5)
    first = classifier_loss(w(x), gens).item()
    for _ in range(100):
        opt.zero_grad()
        loss = classifier_loss(w(x), gens)
        loss.backward()
        opt.step()
    accuracy = (w(x).argmax(-1) == gens).float().mean().item()
    assert loss.item() < first / 3 and accuracy > 0.95
