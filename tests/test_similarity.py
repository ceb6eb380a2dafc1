"""Streaming similarity (Eq. 8-9) against brute force, and HSA hooks against a hand-run layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from layermoe.core.errors import LayermoeError
from layermoe.profiling.hsa import capture_ffn_inputs, decoder_layers, token_mask, tokenizer_prepends_bos
from layermoe.profiling.similarity import (
    SimilarityAccumulator,
    layer_scores,
    pairwise_similarity,
    profile_model,
    sample_sequences,
)
from layermoe.testing import TINY_FAMILIES, make_tiny_model

# ---------------------------------------------------------------- streaming == brute force


def brute_force_matrix(data: dict[str, torch.Tensor]) -> np.ndarray:
    """Mean over all token pairs (j, k), j = k included on the diagonal: [layers, n, n]."""
    langs = list(data)
    layers = next(iter(data.values())).shape[0]
    out = np.zeros((layers, len(langs), len(langs)))
    for i in range(layers):
        for a, la in enumerate(langs):
            for b, lb in enumerate(langs):
                x, y = data[la][i], data[lb][i]  # [n_a, H], [n_b, H]
                cos = torch.nn.functional.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)  # [n_a, n_b]
                out[i, a, b] = cos.mean().item()
    return out


def test_streaming_similarity_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    layers, hidden = 3, 8
    counts = {"en": 5, "el": 17, "hu": 30, "zh": 1}
    # Different offsets per language so that the similarities differ from language to language.
    data = {
        lang: torch.randn(layers, n, hidden, generator=gen, dtype=torch.float64) + k * 0.3
        for k, (lang, n) in enumerate(counts.items())
    }
    acc = SimilarityAccumulator(layers)
    for lang, x in data.items():
        for i in range(layers):
            # In two uneven chunks, the second padded with masked-out garbage rows.
            cut = x.shape[1] // 3
            acc.add(lang, i, x[i, :cut])
            garbage = torch.full((4, hidden), 1e3, dtype=torch.float64)
            rows = torch.cat([x[i, cut:], garbage])[None]  # [1, rows, H]
            mask = torch.cat([torch.ones(x.shape[1] - cut), torch.zeros(4)]).bool()[None]
            acc.add(lang, i, rows, mask)
    assert [acc.count(lang) for lang in counts] == list(counts.values())
    expected = brute_force_matrix(data)
    got = acc.matrix(list(counts))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # Languages in another order permute the matrix.
    np.testing.assert_allclose(acc.matrix(["zh", "en"]), expected[:, [3, 0]][:, :, [3, 0]], atol=1e-9)
    assert pairwise_similarity(acc.mean_unit_vectors()).shape == (layers, 4, 4)


def test_accumulator_errors_on_unprofiled_language():
    acc = SimilarityAccumulator(2)
    acc.add("en", 0, torch.randn(3, 4))
    with pytest.raises(LayermoeError, match="^no hidden states were profiled for language 'el'$"):
        acc.matrix(["el"])
    with pytest.raises(LayermoeError, match="^no tokens were profiled for language 'en' at layer 1$"):
        acc.matrix(["en"])


# ---------------------------------------------------------------- Eq. 9


def test_layer_scores_eq9():
    langs = ["en", "el", "zh", "hu", "tr"]
    rng = np.random.default_rng(1)
    m = rng.uniform(0.1, 0.9, size=(2, 5, 5))
    m = (m + m.transpose(0, 2, 1)) / 2
    old, new = ["en", "zh"], ["el", "hu", "tr"]
    for i in range(2):
        # new-new pairs a<b: (el,hu) (el,tr) (hu,tr); new-old: 3 x 2 pairs.
        nn_ = (m[i, 1, 3] + m[i, 1, 4] + m[i, 3, 4]) / 3
        no = np.mean([m[i, a, b] for a in (1, 3, 4) for b in (0, 2)])
        assert layer_scores(m, langs, old, new)[i] == pytest.approx((nn_ + no) / 2, abs=1e-15)
        # A single new language: the new-old mean alone.
        assert layer_scores(m.tolist(), langs, old, ["hu"])[i] == pytest.approx((m[i, 3, 0] + m[i, 3, 2]) / 2, abs=1e-15)


@pytest.mark.parametrize(
    "old,new,message",
    [
        (["en"], [], "no new languages given: name at least one language to learn"),
        ([], ["el"], "no old languages given: name at least one language the model already knows"),
        (["en", "el"], ["el"], "languages el are listed both as old and as new: list each once"),
        (["en"], ["fi", "el"], "languages fi were not profiled: profile them first"),
    ],
)
def test_layer_scores_errors(old, new, message):
    m = np.ones((1, 2, 2))
    with pytest.raises(LayermoeError) as err:
        layer_scores(m, ["en", "el"], old, new)
    assert str(err.value) == message


# ---------------------------------------------------------------- hooks capture the FFN input


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _hsa_by_hand(model, hidden_in: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Run one decoder layer's attention block and the norm in front of the FFN by hand."""
    seq = hidden_in.shape[1]
    positions = torch.arange(seq)[None]
    cos_sin = model.model.rotary_emb(hidden_in, positions)
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]  # [1, 1, T, T] additive
    attn, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden_in), position_embeddings=cos_sin, attention_mask=causal
    )
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma2: norm the attention output, then pre-FFN norm
        return layer.pre_feedforward_layernorm(hidden_in + layer.post_attention_layernorm(attn))
    return layer.post_attention_layernorm(hidden_in + attn)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hooks_capture_ffn_input(tmp_path, family):
    model, tok = _load(make_tiny_model(tmp_path, family, num_layers=2))
    ids = torch.tensor([tok("Γειά σου κόσμε, hello world")["input_ids"]])
    captured = {}
    with torch.no_grad(), capture_ffn_inputs(model, lambda i, h: captured.__setitem__(i, h.clone())):
        out = model(input_ids=ids, output_hidden_states=True)
    assert sorted(captured) == [0, 1]
    for i, layer in enumerate(decoder_layers(model)):
        with torch.no_grad():
            expected = _hsa_by_hand(model, out.hidden_states[i], layer)
        torch.testing.assert_close(captured[i], expected, rtol=1e-5, atol=1e-5)
        # Not merely the layer input or the residual stream: the norm output.
        assert not torch.allclose(captured[i], out.hidden_states[i], atol=1e-3)
    # Hooks are gone after the context.
    assert all(not layer.mlp._forward_pre_hooks for layer in decoder_layers(model))


def test_decoder_layers_through_a_wrapper(tmp_path):
    model, _ = _load(make_tiny_model(tmp_path, "llama", num_layers=3))

    class Wrapper(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.model = lm

    assert decoder_layers(Wrapper(model)) is model.model.layers
    assert decoder_layers(model.model) is model.model.layers
    with pytest.raises(LayermoeError, match="^cannot find the decoder layers of Linear: "):
        decoder_layers(nn.Linear(2, 2))


# ---------------------------------------------------------------- padding and BOS


def test_padding_excluded(tmp_path):
    model, tok = _load(make_tiny_model(tmp_path, "qwen2", num_layers=2))
    texts = ["hello world, this is a longer sentence", "καλημέρα", "merhaba dünya nasılsın"]
    seqs = [tok(t)["input_ids"] for t in texts]

    def run(batches):
        acc = SimilarityAccumulator(2)
        state = {}
        with torch.no_grad(), capture_ffn_inputs(model, lambda i, h: acc.add("x", i, h, state["mask"])):
            for batch in batches:
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), 1)
                att = torch.zeros((len(batch), width), dtype=torch.long)
                for r, s in enumerate(batch):
                    ids[r, : len(s)] = torch.tensor(s)
                    att[r, : len(s)] = 1
                state["mask"] = token_mask(ids, att, None)
                model(input_ids=ids, attention_mask=att)
        return acc

    batched, single = run([seqs]), run([[s] for s in seqs])
    assert batched.count("x") == single.count("x") == sum(map(len, seqs))
    np.testing.assert_allclose(batched.mean_unit_vectors(), single.mean_unit_vectors(), atol=1e-6)


def _bos_tokenizer(tok):
    from tokenizers.processors import TemplateProcessing

    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)]
    )
    return tok


def test_bos_rule(tmp_path):
    _, tok = _load(make_tiny_model(tmp_path, "llama"))
    assert not tokenizer_prepends_bos(tok)  # the tiny tokenizer adds nothing
    bos_tok = _bos_tokenizer(tok)
    assert tokenizer_prepends_bos(bos_tok)
    ids = torch.tensor([[0, 5, 6, 1], [0, 0, 7, 8]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # Only position 0 holding BOS goes; a BOS id later in the sequence is a real token.
    assert token_mask(ids, att, 0).tolist() == [[False, True, True, False], [False, True, True, True]]
    assert token_mask(ids, att, 0, include_bos=True).tolist() == [[True, True, True, False], [True] * 4]
    assert token_mask(ids, att, None).tolist() == att.bool().tolist()


def test_profile_excludes_bos_and_splits_long_documents(tmp_path):
    model, tok = _load(make_tiny_model(tmp_path, "llama"))
    tok = _bos_tokenizer(tok)
    docs = ["one two three four five six seven eight nine ten " * 3, "short one"]
    seqs = sample_sequences(tok, docs, tokens=40, seed=0, max_length=16, language="en")
    assert all(s[0] == tok.bos_token_id and len(s) <= 16 for s in seqs)
    assert sum(len(s) - 1 for s in seqs) == 40
    seen = []
    result = profile_model(model, tok, {"en": docs}, tokens_per_language=40, progress=lambda *a: seen.append(a))
    assert result.tokens_per_language == {"en": 40}
    assert seen[-1] == ("en", 40, 40)
    result = profile_model(model, tok, {"en": docs}, tokens_per_language=40, include_bos=True)
    assert result.tokens_per_language == {"en": 40}


# ---------------------------------------------------------------- budget and determinism


def _corpus(n=40):
    """The first n builtin sentences of en, el and tr."""
    from layermoe.data import load_texts

    return {lang: load_texts(lang, "builtin", limit=n) for lang in ("en", "el", "tr")}


def test_profile_budget_and_determinism(tmp_path):
    model, tok = _load(make_tiny_model(tmp_path, "qwen3", num_layers=2))
    corpus = _corpus()
    a = profile_model(model, tok, corpus, tokens_per_language=300, batch_tokens=256, seed=3)
    b = profile_model(model, tok, corpus, tokens_per_language=300, batch_tokens=2048, seed=3)
    assert a.tokens_per_language == {lang: 300 for lang in corpus}
    assert a.languages == list(corpus) and np.asarray(a.matrix).shape == (2, 3, 3)
    # Same seed, different batching: same tokens, same similarities.
    np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-6)
    assert sample_sequences(tok, corpus["en"], 300, 3, 64, "en") == sample_sequences(tok, corpus["en"], 300, 3, 64, "en")
    assert sample_sequences(tok, corpus["en"], 300, 3, 64, "en") != sample_sequences(tok, corpus["en"], 300, 4, 64, "en")
    c = profile_model(model, tok, corpus, tokens_per_language=300, seed=4)
    assert not np.allclose(a.matrix, c.matrix, atol=1e-6)
    # Matches a direct accumulation: symmetric, and Eq. 9 computed from it.
    m = np.asarray(a.matrix)
    np.testing.assert_allclose(m, m.transpose(0, 2, 1), atol=1e-12)
    assert a.scores(["en"], ["el", "tr"]) == layer_scores(m, a.languages, ["en"], ["el", "tr"])
    # A budget larger than the text: every token, no more.
    total = sum(len(tok(t)["input_ids"]) for t in corpus["tr"])
    big = profile_model(model, tok, {"tr": corpus["tr"]}, tokens_per_language=10**6)
    assert big.tokens_per_language == {"tr": total}
    assert not model.training


def test_profile_errors(tmp_path):
    model, tok = _load(make_tiny_model(tmp_path, "llama"))
    with pytest.raises(LayermoeError) as err:
        profile_model(model, tok, {"en": ["", "  "]})
    assert str(err.value) == "no text to profile for language 'en': its data is empty"
    with pytest.raises(LayermoeError) as err:
        profile_model(model, tok, {"en": ["x"]}, tokens_per_language=0)
    assert str(err.value) == "tokens per language must be at least 1, got 0"
