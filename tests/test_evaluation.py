"""Held-out bits per byte, old/new grouping, routing health, and the lm-eval bridge."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from layermoe.core.errors import LayermoeError
from layermoe.evaluation import deltas, evaluate_languages, forgetting_and_gain, group_averages, routing_health
from layermoe.evaluation.routing import effective_routing, plot_routing
from layermoe.pipeline.recipes import LM_EVAL_TASKS_DIR as LM_EVAL_TASK_DIR
from layermoe.testing import make_tiny_model

TEXTS = {
    "en": ["Hello world, this is a test.", "", "The cat sat on the mat and looked at the quiet garden for a while."],
    "el": ["Καλημέρα κόσμε, τι κάνεις σήμερα;"],
    "zh": ["你好世界", "我们今天去公园散步。"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """log p = x - max - log(sum(exp(x - max))), in float64. logits [..., V]."""
    x = logits.double()
    top = x.max(dim=-1, keepdim=True).values
    return x - top - (x - top).exp().sum(dim=-1, keepdim=True).log()


def _reference_nll(model, ids: list[int], start_id: int, max_length: int) -> float:
    """Token j of the document is predicted from its own window's inputs only.

    Window of token j (1-based in [start] + ids) begins at ((j - 1) // max_length) * max_length;
    a causal model gives the same logits for a prefix whether or not later tokens follow, so
    one forward per window serves every token in it.
    """
    sequence = [start_id] + ids
    total = 0.0
    for begin in range(0, len(ids), max_length):
        context = torch.tensor([sequence[begin : begin + max_length]])
        with torch.no_grad():
            log_probs = _log_softmax_by_hand(model(input_ids=context).logits[0])  # [L, V]
        for j in range(begin + 1, min(begin + max_length, len(ids)) + 1):
            assert ((j - 1) // max_length) * max_length == begin
            total -= log_probs[j - 1 - begin, sequence[j]].item()
    return total


@pytest.mark.parametrize("max_length,batch_size", [(64, 1), (5, 3), (1, 4)])
def test_bits_per_byte_equals_hand_computation(tiny, max_length, batch_size):
    model, tok = tiny
    # One-token windows need a forward per token in the reference: keep that case short.
    texts_by_language = TEXTS if max_length > 1 else {"zh": TEXTS["zh"]}
    results = evaluate_languages(model, tok, texts_by_language, batch_size=batch_size, max_length=max_length)
    assert list(results) == list(texts_by_language)
    for language, texts in texts_by_language.items():
        docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts if t]
        nll = sum(_reference_nll(model, ids, tok.bos_token_id, max_length) for ids in docs)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        got = results[language]
        assert got.tokens == sum(len(ids) for ids in docs)
        assert got.bytes == nbytes
        assert got.documents == len(docs)
        assert got.nll_nats == pytest.approx(nll, rel=1e-5)
        assert got.bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
        assert got.token_ppl == pytest.approx(math.exp(nll / got.tokens), rel=1e-5)


def test_max_tokens_cuts_only_at_character_boundaries(tiny):
    model, tok = tiny
    text = "你好世界"  # each character is several byte tokens for the tiny tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    # The largest cut <= 3 tokens that does not split a character.
    clean = max(k for k in range(1, 4) if offsets[k][0] >= offsets[k - 1][1])
    assert clean < 3, "the test needs a cap that falls inside a character"
    got = evaluate_languages(model, tok, {"zh": [text, "我们"]}, max_tokens=3, max_length=64)["zh"]
    assert got.tokens == clean
    assert got.bytes == len(text[: offsets[clean - 1][1]].encode("utf-8"))
    assert tok.decode(ids[:clean]) == text[: offsets[clean - 1][1]]
    assert got.nll_nats == pytest.approx(_reference_nll(model, ids[:clean], tok.bos_token_id, 64), rel=1e-5)


def test_max_tokens_takes_whole_documents_first(tiny):
    model, tok = tiny
    first, second = "Hello world, this is a test.", "Καλημέρα κόσμε"
    n_first = len(tok(first, add_special_tokens=False)["input_ids"])
    got = evaluate_languages(model, tok, {"x": [first, second]}, max_tokens=n_first + 3, max_length=64)["x"]
    assert got.tokens == n_first + 3 and got.documents == 2
    assert got.bytes == len(first.encode()) + len("Κα".encode())  # "Κ" is two tokens, "α" one in this vocab


def test_progress_reports_every_batch(tiny):
    model, tok = tiny
    calls = []
    got = evaluate_languages(model, tok, {"en": TEXTS["en"]}, batch_size=1, max_length=8, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("en", got["en"].tokens, got["en"].tokens)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def test_language_without_text_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(LayermoeError, match=r"^language 'hu' has no held-out text to evaluate: give it at least one non-empty document$"):
        evaluate_languages(model, tok, {"hu": ["", ""]})


def test_tokenizer_without_bos_or_eos_is_a_clear_error(tiny):
    model, _ = tiny
    tok = SimpleNamespace(bos_token_id=None, eos_token_id=None, pad_token_id=1, is_fast=True)
    with pytest.raises(LayermoeError, match="neither a BOS nor an EOS"):
        evaluate_languages(model, tok, {"en": ["hi"]})


# --- grouping -------------------------------------------------------------------------

GENERATION = {"en": 0, "es": 0, "el": 1, "hu": 1, "bn": 2, "hi": 2}
BASE = {"en": 1.0, "es": 1.2, "el": 2.0, "hu": 2.2, "bn": 3.0, "hi": 3.4}
AFTER_G2 = {"en": 1.1, "es": 1.25, "el": 1.6, "hu": 1.9, "bn": 2.0, "hi": 2.6}


def test_group_averages_by_generation():
    got = group_averages(AFTER_G2, GENERATION, current_generation=2)
    assert got["old_avg"] == pytest.approx((1.1 + 1.25 + 1.6 + 1.9) / 4)
    assert got["new_avg"] == pytest.approx((2.0 + 2.6) / 2)
    assert got["by_generation"] == pytest.approx({0: 1.175, 1: 1.75, 2: 2.3})
    g1 = group_averages(AFTER_G2, GENERATION, current_generation=1)  # G2 languages are neither old nor new
    assert g1["old_avg"] == pytest.approx(1.175) and g1["new_avg"] == pytest.approx(1.75)
    assert group_averages({"en": 1.0}, GENERATION, 1)["new_avg"] is None


def test_deltas_forgetting_and_gain():
    assert deltas(AFTER_G2, {"en": 1.0, "el": 2.0, "xx": 9.0}) == pytest.approx({"en": 0.1, "el": -0.4})
    got = forgetting_and_gain(AFTER_G2, BASE, GENERATION, current_generation=2)
    assert got["forgetting"] == pytest.approx((0.1 + 0.05 - 0.4 - 0.3) / 4)
    assert got["gain"] == pytest.approx((1.0 + 0.8) / 2)


def test_unknown_language_is_a_clear_error():
    with pytest.raises(LayermoeError, match=r"^language 'tr' belongs to no generation \(known languages: el, en\)"):
        group_averages({"tr": 1.0}, {"en": 0, "el": 1}, 1)


# --- routing health -------------------------------------------------------------------


def test_effective_routing_applies_the_classifier():
    router = torch.tensor([[0.0, 2.0, 1.0, 3.0], [5.0, 1.0, 0.0, 2.0], [0.0, 1.0, 4.0, 3.0], [0.0, 3.0, 2.0, 1.0]])
    generations = torch.tensor([0, 1, 2, 2])
    # Binary classifier: token 0 and 3 classified old -> expert 0 alone, whatever the router says.
    binary = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [2.0, -1.0]])
    top1, slots, predicted = effective_routing(router, binary, generations, top_k=2)
    assert top1.tolist() == [0, 0, 2, 0]
    assert predicted.tolist() == [0, 1, 1, 0]
    assert slots.tolist() == [[1, 0, 0, 0], [0.5, 0, 0, 0.5], [0, 0, 0.5, 0.5], [1, 0, 0, 0]]
    # Per-generation classifier: class 1 may only use experts of generations <= 1.
    three = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    top1, slots, _ = effective_routing(router, three, generations, top_k=2)
    assert top1.tolist() == [1, 0, 1, 1]
    assert slots.tolist() == [[0.5, 0.5, 0, 0], [0.5, 0, 0, 0.5], [0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]]
    top1, slots, predicted = effective_routing(router, None, generations, top_k=2)
    assert top1.tolist() == [3, 0, 2, 1] and predicted is None


class FakeExpandedModel(torch.nn.Module):
    """Stands in for the expanded model: router/classifier logits are lookup tables by token id.

    Layer 0: 3 experts (G0, G1, G1) + binary classifier; layer 2: 4 experts (G0, G1, G2, G2)
    + per-generation classifier; layer 3: 2 experts, no classifier. Layer 1 is dense.
    """

    GENERATIONS = {0: [0, 1, 1], 2: [0, 1, 2, 2], 3: [0, 1]}
    CLASSES = {0: 2, 2: 3}

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(num_experts_per_tok=2, max_position_embeddings=64)
        self.router = {layer: torch.randn(vocab, len(gens), generator=g) for layer, gens in self.GENERATIONS.items()}
        self.classifier = {layer: torch.randn(vocab, c, generator=g) for layer, c in self.CLASSES.items()}

    def expert_generation_ids(self, layer):
        return torch.tensor(self.GENERATIONS[layer])

    def forward(self, input_ids, attention_mask=None, output_router_logits=False):
        flat = input_ids.reshape(-1)  # [T], T = batch * seq, padding included
        return SimpleNamespace(
            router_logits={layer: table[flat] for layer, table in self.router.items()},
            classifier_logits={layer: table[flat] for layer, table in self.classifier.items()},
        )


def _reference_routing(model, tok, texts_by_language, generation, current, top_k=2):
    """Slow per-token loop over the definition in routing.py's docstring."""
    from collections import defaultdict

    count = defaultdict(float)
    load = defaultdict(lambda: defaultdict(float))
    tokens = defaultdict(int)
    for lang, texts in texts_by_language.items():
        g = generation[lang]
        group = "old" if g < current else "new" if g == current else None
        for text in texts:
            for x in tok(text, add_special_tokens=False)["input_ids"]:
                tokens[lang] += 1
                for layer, gens in model.GENERATIONS.items():
                    r = model.router[layer][x].tolist()
                    chosen = None
                    if layer in model.CLASSES:
                        c = max(range(model.CLASSES[layer]), key=lambda i: model.classifier[layer][x][i].item())
                        label = (0 if g == 0 else 1) if model.CLASSES[layer] == 2 else g
                        count["correct", layer, group] += c == label
                        count["correct", layer, "all"] += c == label
                        if c == 0:
                            chosen = [0]
                        allowed = [e for e in range(len(gens)) if model.CLASSES[layer] == 2 or gens[e] <= c]
                    else:
                        allowed = list(range(len(gens)))
                    if chosen is None:
                        chosen = sorted(allowed, key=lambda e: -r[e])[: min(top_k, len(allowed))]
                    count["e0", layer, lang] += chosen[0] == 0
                    count["router_e0", layer, lang] += max(range(len(gens)), key=lambda e: r[e]) == 0
                    for e in chosen:
                        load[layer, group][e] += 1 / len(chosen)
                        load[layer, "all"][e] += 1 / len(chosen)
    return count, load, tokens


def test_routing_health_matches_a_per_token_reference(tiny):
    _, tok = tiny
    model = FakeExpandedModel(len(tok))
    texts = {"en": TEXTS["en"], "el": TEXTS["el"], "zh": TEXTS["zh"]}
    generation = {"en": 0, "el": 1, "zh": 2}
    got = routing_health(model, tok, texts, generation, current_generation=2, batch_size=2, max_length=9).to_dict()
    count, load, tokens = _reference_routing(model, tok, texts, generation, current=2)
    assert got["layers"] == [0, 2, 3] and got["experts_per_layer"] == [3, 4, 2]
    assert got["classifier_layers"] == [0, 2]
    assert got["expert_generations"] == [[0, 1, 1], [0, 1, 2, 2], [0, 1]]
    assert got["tokens"] == dict(tokens)
    old = ["en", "el"]
    for i, layer in enumerate(got["layers"]):
        for lang in texts:
            assert got["expert0_share_by_language"][lang][i] == pytest.approx(count["e0", layer, lang] / tokens[lang])
        n_old = sum(tokens[l] for l in old)
        assert got["expert0_share"]["old"][i] == pytest.approx(sum(count["e0", layer, l] for l in old) / n_old)
        assert got["router_expert0_share"]["old"][i] == pytest.approx(sum(count["router_e0", layer, l] for l in old) / n_old)
        assert got["expert0_share"]["new"][i] == pytest.approx(count["e0", layer, "zh"] / tokens["zh"])
        assert got["expert0_share_by_generation"]["1"][i] == pytest.approx(count["e0", layer, "el"] / tokens["el"])
        total = sum(tokens.values())
        expected_load = [load[layer, "all"][e] / total for e in range(got["experts_per_layer"][i])]
        assert got["load"][i] == pytest.approx(expected_load)
        assert sum(got["load"][i]) == pytest.approx(1.0)
        assert got["load_by_group"]["new"][i] == pytest.approx([load[layer, "new"][e] / tokens["zh"] for e in range(len(expected_load))])
    for c, layer in enumerate(got["classifier_layers"]):
        assert got["classifier_accuracy"]["old"][c] == pytest.approx(count["correct", layer, "old"] / sum(tokens[l] for l in old))
        assert got["classifier_accuracy"]["new"][c] == pytest.approx(count["correct", layer, "new"] / tokens["zh"])
        assert got["classifier_accuracy"]["all"][c] == pytest.approx(count["correct", layer, "all"] / sum(tokens.values()))
    assert "effective routing" in got["note"]


def test_routing_health_plot_and_dense_model_error(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(LayermoeError, match="needs an expanded layermoe model"):
        routing_health(model, tok, {"en": ["Hello"]}, {"en": 0}, 1)
    fake = FakeExpandedModel(len(tok))
    got = routing_health(fake, tok, {"en": ["Hello world"], "el": ["Καλημέρα"]}, {"en": 0, "el": 1}, 1).to_dict()
    plot_routing(got, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LayermoeError, match="no MoE layer to plot"):
        plot_routing({"layers": []}, tmp_path / "empty.png")


# --- lm-evaluation-harness bridge -----------------------------------------------------


def _choice_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens the way lm-eval's HFLM does."""
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids) :]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = _log_softmax_by_hand(model(input_ids=ids).logits[0])  # [L, V]
    start = len(context_ids)
    return sum(log_probs[start - 1 + i, t].item() for i, t in enumerate(continuation_ids))


def test_lm_eval_bridge_on_a_local_task_matches_hand_scoring(tiny):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'layermoe[eval]'")
    import json

    from layermoe.evaluation.lm_eval import run_lm_eval

    model, tok = tiny
    out = run_lm_eval(model, tok, ["layermoe_tiny_mc"], include_path=LM_EVAL_TASK_DIR, include_defaults=False, return_samples=True)
    assert out["tasks"] == ["layermoe_tiny_mc"] and re.fullmatch(r"\d+\.\d+\.\d+.*", out["lm_eval_version"])
    assert out["n_samples"]["layermoe_tiny_mc"] == {"original": 6, "effective": 6}
    metrics = out["results"]["layermoe_tiny_mc"]
    docs = [json.loads(line) for line in (LM_EVAL_TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    by_id = {s["doc_id"]: s for s in out["samples"]["layermoe_tiny_mc"]}
    correct = correct_norm = 0
    for i, doc in enumerate(docs):
        context = f"Question: {doc['question']}\nAnswer:"
        mine = [_choice_loglikelihood(model, tok, context, " " + choice) for choice in doc["choices"]]
        theirs = [resp[0] for resp in by_id[i]["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-4)
        correct += max(range(len(mine)), key=mine.__getitem__) == doc["answer"]
        normed = [ll / len(choice) for ll, choice in zip(mine, doc["choices"])]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == doc["answer"]
    assert metrics["acc,none"] == pytest.approx(correct / len(docs))
    assert metrics["acc_norm,none"] == pytest.approx(correct_norm / len(docs))


def test_lm_eval_bridge_batches_give_the_figures_of_batch_size_one(tiny):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'layermoe[eval]'")
    from layermoe.evaluation.lm_eval import parse_batch_size, run_lm_eval

    assert [parse_batch_size(v) for v in ("1", "16", "auto", "auto:4", 8)] == [1, 16, "auto", "auto:4", 8]
    model, tok = tiny
    kwargs = dict(include_path=LM_EVAL_TASK_DIR, include_defaults=False, return_samples=True)
    one = run_lm_eval(model, tok, ["layermoe_tiny_mc"], batch_size=1, **kwargs)
    four = run_lm_eval(model, tok, ["layermoe_tiny_mc"], batch_size="4", **kwargs)
    assert four["results"] == one["results"]
    lls = [{s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in out["samples"]["layermoe_tiny_mc"]} for out in (one, four)]
    assert lls[0].keys() == lls[1].keys() == set(range(6))
    for doc in lls[0]:  # padded batches score each choice as alone, up to float rounding
        assert lls[1][doc] == pytest.approx(lls[0][doc], abs=1e-4)


def test_lm_eval_bridge_without_lm_eval_says_how_to_install(tiny, monkeypatch):
    import sys

    from layermoe.evaluation.lm_eval import run_lm_eval

    model, tok = tiny
    with pytest.raises(LayermoeError, match=r"^no lm-eval task given"):
        run_lm_eval(model, tok, [])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail like a missing package
    with pytest.raises(LayermoeError, match=r"^benchmarks need lm-evaluation-harness, which is not installed .*: pip install 'layermoe\[eval\]'$"):
        run_lm_eval(model, tok, ["arc_easy"])


def test_lm_eval_bridge_names_unknown_tasks(tiny):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'layermoe[eval]'")
    from layermoe.evaluation import lm_eval as lm_eval_bridge

    model, tok = tiny
    with pytest.raises(LayermoeError, match=r"^unknown lm-eval task\(s\): no_such_task"):
        lm_eval_bridge.run_lm_eval(model, tok, ["no_such_task"], include_path=LM_EVAL_TASK_DIR, include_defaults=False)
    with pytest.raises(LayermoeError, match=r"is not a folder of task YAML files$"):
        lm_eval_bridge.run_lm_eval(model, tok, ["x"], include_path=LM_EVAL_TASK_DIR / "missing")


def test_routing_health_agrees_with_the_expanded_models_own_dispatch(tiny):
    """On the real LayerMoE model (G0 -> G1 -> G2), effective top-1 and load equal what its MoE blocks compute."""
    modeling = pytest.importorskip("layermoe.modeling")
    base, tok = tiny
    model = modeling.upcycle(base, [2, 1], classifier_layers=[0], seed=1)
    modeling.add_generation(model, [1, 2], classifier_layers=[1], classifier_classes=3, seed=2)
    with torch.no_grad():  # spread the router logits so float noise cannot flip a top-k choice
        for block in model.moe_blocks().values():
            block.router.weight.mul_(50)
            if block.classifier is not None:
                block.classifier.weight.mul_(50)
    model.eval()
    texts = {"en": TEXTS["en"], "el": TEXTS["el"], "zh": TEXTS["zh"]}
    generation = {"en": 0, "el": 1, "zh": 2}
    got = routing_health(model, tok, texts, generation, current_generation=2, batch_size=2).to_dict()
    blocks = model.moe_blocks()
    assert got["layers"] == sorted(blocks) and got["classifier_layers"] == [1]
    expert0 = {}
    slots = {layer: torch.zeros(len(got["load"][i]), dtype=torch.float64) for i, layer in enumerate(got["layers"])}
    for lang, docs in texts.items():
        for text in filter(None, docs):
            ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = model(ids, output_router_logits=True)
            for layer, block in blocks.items():
                cls = out.classifier_logits.get(layer)
                token_idx, expert_idx, weight = block.dispatch_plan(out.router_logits[layer], None if cls is None else cls.argmax(-1))
                for t in range(1, ids.shape[1]):  # position 0 is the start token
                    mine = token_idx == t
                    top1 = expert_idx[mine][weight[mine].argmax()].item()
                    expert0[layer, lang] = expert0.get((layer, lang), 0) + (top1 == 0)
                    for e in expert_idx[mine].tolist():
                        slots[layer][e] += 1 / mine.sum().item()
    total = sum(got["tokens"].values())
    for i, layer in enumerate(got["layers"]):
        for lang in texts:
            assert got["expert0_share_by_language"][lang][i] == pytest.approx(expert0[layer, lang] / got["tokens"][lang])
        assert got["load"][i] == pytest.approx((slots[layer] / total).tolist())


def test_single_pass_routing_and_bpb_equal_the_two_pass_figures(tiny):
    """measure_languages records the routing in the bits-per-byte forward: same counts as routing_health's own pass."""
    from layermoe.evaluation import measure_languages, summarise_routing

    modeling = pytest.importorskip("layermoe.modeling")
    base, tok = tiny
    model = modeling.upcycle(base, [2, 1], classifier_layers=[0], seed=1)
    modeling.add_generation(model, [1, 2], classifier_layers=[1], classifier_classes=3, seed=2)
    model.eval()
    texts = {"en": TEXTS["en"], "el": TEXTS["el"], "zh": TEXTS["zh"]}
    generation = {"en": 0, "el": 1, "zh": 2}
    for max_length, max_tokens in ((64, None), (5, 12)):  # long windows, and documents cut into windows and capped
        one = measure_languages(model, tok, texts, max_tokens=max_tokens, batch_size=2, max_length=max_length,
                                routing_generation=generation)
        two_routing = routing_health(model, tok, texts, generation, current_generation=2, max_tokens=max_tokens,
                                     batch_size=2, max_length=max_length)
        assert summarise_routing(one.routing, generation, 2).to_dict() == two_routing.to_dict()
        two_bpb = evaluate_languages(model, tok, texts, max_tokens=max_tokens, batch_size=2, max_length=max_length)
        for lang in texts:
            assert (one.languages[lang].tokens, one.languages[lang].bytes) == (two_bpb[lang].tokens, two_bpb[lang].bytes)
            assert one.languages[lang].nll_nats == pytest.approx(two_bpb[lang].nll_nats, rel=1e-6)
