"""Language-specific neurons (NeuronMoE) in the profile pass: AP against its definition, pooling and
top-N counts against a document-by-document run, and expert 0's neurons in an expanded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layermoe.profiling.hsa import decoder_layers
from layermoe.profiling.neurons import average_precision, average_precisions, count_unique
from layermoe.profiling.similarity import _max_length, profile_model, sample_sequences
from layermoe.testing import make_tiny_model


def brute_force_ap(scores: list[float], positive: list[bool]) -> float:
    """AP by its definition: mean over positives of the precision at the threshold of their score."""
    pos = [s for s, p in zip(scores, positive) if p]
    return float(np.mean([sum(q >= s for q in pos) / sum(q >= s for q in scores) for s in pos]))


@pytest.mark.parametrize("chunk_elements", [1 << 24, 41 * 7])  # one chunk of neurons, or several
def test_average_precision_equals_its_definition_with_ties(monkeypatch, chunk_elements):
    monkeypatch.setattr("layermoe.profiling.neurons._AP_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(41, 30, generator=gen, dtype=torch.float64)
    scores[:, :12] = scores[:, :12].mul(2).round()  # many tied scores
    scores[:, 12] = 0.5  # all tied: AP = share of positives
    positive = torch.rand(41, generator=gen) < 0.3
    scores[:, 13] = positive.double()  # perfectly separating: AP = 1
    got = average_precision(scores, positive)
    expected = [brute_force_ap(scores[:, j].tolist(), positive.tolist()) for j in range(30)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    owner = torch.randint(0, 3, (41,), generator=gen)  # three languages at once, sorted once
    multi = average_precisions(scores, owner, 4)
    for c in range(3):
        np.testing.assert_allclose(multi[c].numpy(), [brute_force_ap(scores[:, j].tolist(), (owner == c).tolist())
                                                      for j in range(30)], rtol=0, atol=1e-12)
    assert multi[3].isnan().all()  # a language without documents
    assert got[12] == pytest.approx(positive.double().mean().item()) and got[13] == 1.0
    try:  # scikit-learn (an lm-eval dependency) uses the same tie convention
        from sklearn.metrics import average_precision_score
    except ImportError:
        return
    np.testing.assert_allclose(got.numpy(), [average_precision_score(positive, scores[:, j]) for j in range(30)], atol=1e-12)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _corpus(n=30):
    """The first n builtin sentences of en, el and tr."""
    from layermoe.data import load_texts

    return {lang: load_texts(lang, "builtin", limit=n) for lang in ("en", "el", "tr")}


def test_profile_pass_neuron_counts_equal_a_document_by_document_run(tmp_path):
    model, tok = _load(make_tiny_model(tmp_path, "llama", num_layers=2))
    corpus, cap, top_n = _corpus(), 6, 25
    result = profile_model(model, tok, corpus, tokens_per_language=400, batch_tokens=300, neuron_top_n=top_n,
                           neuron_documents=cap)
    # By hand: each of the first `cap` sampled sequences alone, its down_proj input averaged over its tokens.
    pooled = {lang: [[], []] for lang in corpus}
    captured = {}
    layers = decoder_layers(model)
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for lang, texts in corpus.items():
            for seq in sample_sequences(tok, texts, 400, 0, min(_max_length(model), 300), lang)[:cap]:
                model(input_ids=torch.tensor([seq]))
                for i in range(2):
                    pooled[lang][i].append(captured[i][0].mean(0))
    for h in hooks:
        h.remove()
    assert result.neurons.documents == {lang: len(pooled[lang][0]) for lang in corpus}
    assert result.neurons.documents["en"] == cap and min(result.neurons.documents.values()) >= 3
    langs = list(corpus)
    ap = {}
    for k, lang in enumerate(langs):
        ap[lang] = []
        for i in range(2):
            scores = torch.stack([p for other in langs for p in pooled[other][i]])  # [docs, I]
            labels = [other == lang for other in langs for _ in pooled[other][i]]
            ap[lang].append(torch.tensor([brute_force_ap(scores[:, j].tolist(), labels) for j in range(scores.shape[1])]))
    # Top-N over all layers per language, ties to the lower layer and index; union counted per layer.
    expected_union, expected_own = [0, 0], {}
    union = set()
    for lang in langs:
        flat = sorted(((-float(v), i, j) for i in range(2) for j, v in enumerate(ap[lang][i])))[:top_n]
        union |= {(i, j) for _, i, j in flat}
        expected_own[lang] = [sum(1 for _, i, _ in flat if i == layer) for layer in range(2)]
    expected_union = [sum(1 for i, _ in union if i == layer) for layer in range(2)]
    assert result.neurons.per_language == expected_own
    assert result.neurons.unique_per_layer == expected_union
    assert result.neurons.top_n == top_n and len(union) >= top_n
    assert count_unique(ap, 10**6, {}).unique_per_layer == [64, 64]  # N above the neuron count: every neuron


def test_expanded_model_reads_expert0_neurons_and_routing_mass(tmp_path):
    from layermoe.modeling import upcycle

    dense, tok = _load(make_tiny_model(tmp_path, "qwen2", num_layers=3, shared_direction=0.05))
    moe = upcycle(dense, [2, 0, 1], classifier_layers=[0]).eval()
    corpus = _corpus(12)
    kwargs = dict(tokens_per_language=200, batch_tokens=256, neuron_top_n=30, neuron_documents=4)
    a = profile_model(dense, tok, corpus, **kwargs)
    b = profile_model(moe, tok, corpus, **kwargs)
    # Every expert is a copy of expert 0: same HSA, same neurons, whichever expert the router picks.
    np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-6)
    assert a.neurons == b.neurons and a.routing_mass is None
    for lang, layers in b.routing_mass.items():
        assert [len(m) for m in layers] == [3, 1, 2]  # experts per layer, a dense layer has expert 0 alone
        for masses in layers:  # each token spreads weight 1 over its experts
            assert sum(masses) == pytest.approx(b.tokens_per_language[lang])
