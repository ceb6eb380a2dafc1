"""Tests of vocab_extend on SmolLM2's tokenizer and on Llama-2/Llama-3-style tokenizers built here.

Small samples and small N keep the whole file well under a minute; the first run converts
SmolLM2's GGUF tokenizer once (about 20 s) into .cache/.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, models

from layermoe.testing import corpus, llama2_style_json, llama3_style_json, smollm2_json, split
from layermoe.vocabulary import checks, counting, extension, files, kinds, learning
from layermoe.vocabulary.counting import tokenizer_from_json
from layermoe.vocabulary.extension import extend_tokenizer
from layermoe.vocabulary.kinds import VocabError


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M's tokenizer folder, converted from the demo GGUF once."""
    folder = tmp_path_factory.mktemp("smollm2")
    smollm2_json(folder)
    return folder


@pytest.fixture(scope="session")
def bases(smollm2_dir):
    return {
        "smollm2": smollm2_json(smollm2_dir),
        "llama2": llama2_style_json(vocab_size=2000),
        "llama2-metaspace": llama2_style_json(vocab_size=2000, metaspace=True),
        "llama3": llama3_style_json(vocab_size=2000),
    }


def train(lang, n):
    return split(lang)[0][:n]


def heldout(lang):
    return split(lang)[1]


def old_sample(langs, n=200):
    return {lang: heldout(lang) + train(lang, n) for lang in langs}


NEW = ("hu", "tr", "el", "bn")  # two Latin-script languages next to Latin-script old ones, two new scripts
OLD = ("en", "de", "ru")


@pytest.fixture(scope="session")
def extended(bases):
    """One extension per tokenizer style: mixed scripts, N = 400."""
    return {name: extend_tokenizer(base, {lang: train(lang, 150) for lang in NEW}, old_sample(OLD), 400,
                                   heldout_texts={lang: heldout(lang) for lang in NEW})
            for name, base in bases.items()}


_TOKENIZERS: dict[int, tuple[dict, Tokenizer]] = {}


def load(tokenizer_json: dict) -> Tokenizer:
    """tokenizer_from_json, once per (unchanged) dict: loading SmolLM2's takes a third of a second."""
    cached = _TOKENIZERS.get(id(tokenizer_json))
    if cached is None or cached[0] is not tokenizer_json:
        cached = _TOKENIZERS[id(tokenizer_json)] = (tokenizer_json, tokenizer_from_json(tokenizer_json))
    return cached[1]


def encode(tokenizer, texts):
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


# --- old ids unchanged ----------------------------------------------------------------------

@pytest.mark.parametrize("style", ["smollm2", "llama2", "llama2-metaspace", "llama3"])
def test_old_languages_keep_their_ids_next_to_latin_script_new_languages(bases, extended, style):
    result, base = extended[style], bases[style]
    rep = result.report
    assert rep.new_tokens == 400 and rep.old_unchanged_share == 1.0 and rep.old_docs_checked == rep.old_docs_unchanged
    assert rep.rejected_by_old_languages > 0  # hu/tr pairs that English/German use were refused
    b, e = load(base), load(result.tokenizer_json)
    for lang, texts in old_sample(OLD).items():  # independently of the report
        assert encode(b, texts) == encode(e, texts), lang
    info = kinds.describe_tokenizer(base)
    assert sorted(result.new_token_sources) == list(range(info.next_id, info.next_id + 400))
    for lang in NEW:  # and the new languages do compress
        assert rep.languages[lang]["heldout"]["ratio"] > 1.03, lang


def test_new_ids_come_after_special_tokens_that_sit_after_the_vocab(bases, extended):
    base, result = bases["llama3"], extended["llama3"]
    specials = {t["content"]: t["id"] for t in base["added_tokens"]}
    assert min(result.new_token_sources) == max(specials.values()) + 1
    e = load(result.tokenizer_json)
    assert all(e.token_to_id(content) == i for content, i in specials.items())
    assert e.encode("hi").ids[0] == specials["<|begin_of_text|>"]
    assert e.get_vocab_size() == max(result.new_token_sources) + 1


# --- round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["smollm2", "llama2", "llama3"])
def test_round_trip_on_every_language_of_the_corpus(bases, extended, style):
    b, e = load(bases[style]), load(extended[style].tokenizer_json)
    for lang, texts in corpus().items():
        texts = texts[:15]
        got = e.decode_batch(encode(e, texts))
        want = [t if t == d else d for t, d in zip(texts, b.decode_batch(encode(b, texts)))]
        assert got == want, lang


# --- lifelong -------------------------------------------------------------------------------

def test_extending_twice_keeps_g0_and_g1_texts(bases):
    base = bases["smollm2"]
    g1 = extend_tokenizer(base, {"el": train("el", 150), "hu": train("hu", 150)}, old_sample(["en"]), 300)
    g2 = extend_tokenizer(g1.tokenizer_json, {"bn": train("bn", 150), "tr": train("tr", 150)},
                          old_sample(["en", "el", "hu"]), 300, attach_marks=True)
    t0, t1, t2 = (load(j) for j in (base, g1.tokenizer_json, g2.tokenizer_json))
    english = old_sample(["en"])["en"]
    assert encode(t0, english) == encode(t2, english)  # G0
    for lang in ("el", "hu"):  # G1, with G1's tokens
        texts = old_sample([lang])[lang]
        assert encode(t1, texts) == encode(t2, texts)
        assert encode(t1, texts) != encode(t0, texts)
    assert min(g2.new_token_sources) == max(g1.new_token_sources) + 1
    merges1, merges2 = g1.tokenizer_json["model"]["merges"], g2.tokenizer_json["model"]["merges"]
    assert merges2[: len(merges1)] == merges1
    assert all(max(sources) <= max(g1.new_token_sources) for sources in g2.new_token_sources.values())


# --- traps ----------------------------------------------------------------------------------

def _trap_merges(base, texts):
    """(text, A, b1, b2): two merges whose final token equals an old two-token pre-token [A, B] of
    the text without either merge pairing tokens adjacent in it: (A, b1), then (Ab1, b2) where
    B = b1 + b2 is an old merge."""
    b = load(base)
    for text in texts:
        found = _trap_in(base, b.encode(text, add_special_tokens=False))
        if found:
            return (text, *found)
    raise AssertionError("no two-token word in the texts")


def _trap_in(base, enc):
    merges = {m[0] + m[1]: tuple(m) for m in base["model"]["merges"]}
    vocab = base["model"]["vocab"]
    for k in range(len(enc.ids) - 1):
        if enc.word_ids[k] == enc.word_ids[k + 1] and (k + 2 == len(enc.ids) or enc.word_ids[k + 2] != enc.word_ids[k]):
            a, big = enc.tokens[k], enc.tokens[k + 1]
            if (k == 0 or enc.word_ids[k - 1] != enc.word_ids[k]) and big in merges and a + merges[big][0] not in vocab:
                return a, *merges[big]
    return None


def test_ignore_merges_trap_is_real_and_guarded(bases):
    """Llama 3 emits a pre-token that is in the vocab whole, so a new token equal to an old
    two-token word changes it although no new merge pairs two tokens adjacent in it."""
    base = bases["llama3"]
    text, a, b1, b2 = _trap_merges(base, train("en", 100))
    info = kinds.describe_tokenizer(base)
    trapped = json.loads(json.dumps(base))
    trapped["model"]["vocab"].update({a + b1: info.next_id, a + b1 + b2: info.next_id + 1})
    trapped["model"]["merges"] += [[a, b1], [a + b1, b2]]
    with pytest.raises(VocabError, match=r"^refusing the extension: it would change the tokens of 1 of 1 old-language documents \(en: 1\)$"):
        checks.verify_old_texts_unchanged(base, trapped, {"en": [text]})
    plain = json.loads(json.dumps(base))
    for j in (plain, trapped):  # without ignore_merges the same merges are harmless
        j["model"]["ignore_merges"] = False
    checks.verify_old_texts_unchanged(plain, trapped, {"en": [text]})

    # the learner refuses the second merge for exactly this reason
    tok = load(base)
    old = counting.old_language_constraints(tok, info, {"en": [text]})
    assert a + b1 + b2 in old.pretoken_strings
    learner = learning.MergeLearner([], [], [], [], info, old, counting.model_only_tokenizer(base), 2)
    first = info.next_id
    learner.strings[first], learner.sources[first] = a + b1, [info.vocab[a], info.vocab[b1]]
    assert learner._pair_verdict((first, info.vocab[b2])) == kinds.R_OLD_PRETOKEN
    assert learner._pair_verdict((info.vocab[a], info.vocab[b1])) is None  # (a, b1) itself is fine


def test_byte_fallback_new_script_gets_its_characters_first(bases):
    base = bases["llama2"]
    info = kinds.describe_tokenizer(base)
    old = old_sample(["en", "es"])
    old["en"] = old["en"] + ["The Bengali letter অ is the first vowel."]
    result = extend_tokenizer(base, {"bn": train("bn", 200)}, old, 300, heldout_texts={"bn": heldout("bn")})
    chars = [t for t in result.new_tokens if t.is_character]
    assert len(chars) > 30 and result.report.new_characters == len(chars)
    byte_id = {v: i for i, v in info.byte_ids.items()}
    for t in chars:
        assert len(t.string) == 1 and result.new_token_sources[t.id] == [byte_id[b] for b in t.string.encode()]
    assert "অ" not in {t.string for t in chars} and result.report.rejected[kinds.R_OLD_CHARACTER] >= 1
    assert result.report.old_unchanged_share == 1.0
    # merges only combine real tokens, never <0xXX>
    assert not any(set(t.parts) & info.byte_ids.keys() for t in result.new_tokens if not t.is_character)
    e = load(result.tokenizer_json)
    ids = [i for ids in encode(e, heldout("bn")) for i in ids]
    assert sum(i in info.byte_ids for i in ids) < 0.1 * len(ids)  # was ~100% bytes
    assert result.report.languages["bn"]["heldout"]["ratio"] > 3


def test_sentencepiece_style_tokens_never_span_a_word_boundary(extended):
    for style in ("llama2", "llama2-metaspace"):
        for t in extended[style].new_tokens:
            body = t.string.lstrip(kinds.SPACE_MARK)
            assert body and kinds.SPACE_MARK not in body and len(t.string) - len(body) <= 1, t.string
            assert t.is_character or not any(ch.isdigit() for ch in t.string), t.string  # the base never merges digits


# --- refusal of a bad merge -----------------------------------------------------------------

def test_refuses_when_the_old_language_guard_is_disabled(bases, monkeypatch):
    real = counting.old_language_constraints

    def no_guard(*args, **kwargs):
        constraints = real(*args, **kwargs)
        constraints.adjacent_pairs = set()
        return constraints

    monkeypatch.setattr(extension, "old_language_constraints", no_guard)
    with pytest.raises(VocabError, match=r"^refusing the extension: it would change the tokens of [1-9]\d* of \d+ old-language documents \(en: [1-9]\d*\)$"):
        extend_tokenizer(bases["smollm2"], {"hu": train("hu", 200), "tr": train("tr", 200)}, old_sample(["en"]), 300)


def test_verification_catches_one_injected_merge(bases):
    base = bases["smollm2"]
    b = load(base)
    text = "An unbelievably transparent argument."
    encoding = b.encode(text, add_special_tokens=False)
    vocab = base["model"]["vocab"]
    pair = next((encoding.tokens[k], encoding.tokens[k + 1]) for k in range(len(encoding.ids) - 1)
                if encoding.word_ids[k] == encoding.word_ids[k + 1] and "".join(encoding.tokens[k:k + 2]) not in vocab)
    bad = json.loads(json.dumps(base))
    bad["model"]["vocab"]["".join(pair)] = max(vocab.values()) + 1
    bad["model"]["merges"].append(list(pair))
    with pytest.raises(VocabError) as error:
        checks.verify_old_texts_unchanged(base, bad, {"en": [text, "Nothing to see here."]})
    assert str(error.value) == "refusing the extension: it would change the tokens of 1 of 2 old-language documents (en: 1)"


# --- decomposition --------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["smollm2", "llama2", "llama3"])
def test_each_new_token_replaces_its_base_tokenization(bases, extended, style):
    result = extended[style]
    bare = counting.model_only_tokenizer(bases[style])
    for t in result.new_tokens:
        assert result.new_token_sources[t.id] == bare.encode(t.string, add_special_tokens=False).ids, t.string
    # so expanding every new id into its sources gives back exactly the base ids, text by text
    b, e = load(bases[style]), load(result.tokenizer_json)
    sources = result.new_token_sources
    for lang in NEW:
        texts = heldout(lang) + train(lang, 50)
        expanded = [[s for i in ids for s in sources.get(i, [i])] for ids in encode(e, texts)]
        assert expanded == encode(b, texts), lang


# --- embedding init -------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_their_sources_and_old_text_computes_the_same(tied, tmp_path):
    """add_token_rows: input rows (and untied output rows) = the mean of the tokens each new token
    replaces; the old rows and the hidden states of old-token inputs are exactly as before."""
    import torch
    from transformers import AutoModelForCausalLM

    from layermoe.modeling import upcycle
    from layermoe.modeling.vocabulary import add_token_rows
    from layermoe.testing import make_tiny_model

    base = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", tie_word_embeddings=tied)).eval()
    model = upcycle(base, [1, 1]).eval()
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    rows = old_in.shape[0]
    sources = {rows: [1, 2], rows + 1: [3], rows + 2: [0, 5, 9]}
    ids = torch.randint(2, rows, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, output_hidden_states=True)
    assert add_token_rows(model, sources) == rows + 3
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (new_in is new_out) == tied and torch.equal(new_in[:rows], old_in) and torch.equal(new_out[:rows], old_out)
    for token, src in sources.items():
        assert torch.equal(new_in[token], old_in[src].float().mean(0).to(old_in.dtype))
        assert torch.equal(new_out[token], old_out[src].float().mean(0).to(old_out.dtype))
    with torch.no_grad():
        after = model(ids, output_hidden_states=True)
    assert torch.equal(before.hidden_states[-1], after.hidden_states[-1])
    assert torch.equal(before.logits, after.logits[..., :rows])
    assert model.config.vocab_size == model.config.base_config["vocab_size"] == rows + 3
    # a matrix padded past the tokenizer (Qwen): new ids inside it reuse those rows
    assert add_token_rows(model, {rows: [7]}) == rows + 3
    assert torch.equal(model.get_input_embeddings().weight[rows], old_in[7])


# --- loading with transformers --------------------------------------------------------------

def test_saved_tokenizer_loads_verbatim_with_autotokenizer(bases, tmp_path, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    texts = heldout("hi")[:10] + heldout("en")[:10]
    result = extend_tokenizer(bases["smollm2"], {"hi": train("hi", 150)}, old_sample(["en"]), 200, attach_marks=True)
    out = files.save_tokenizer(result.tokenizer_json, tmp_path / "ok", smollm2_dir)
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    direct = load(result.tokenizer_json)
    assert [loaded(t, add_special_tokens=False)["input_ids"] for t in texts] == encode(direct, texts)
    assert len(loaded) == max(result.new_token_sources) + 1
    loaded.save_pretrained(str(tmp_path / "resaved"))  # what layermoe does with a checkpoint's tokenizer
    resaved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert [resaved(t, add_special_tokens=False)["input_ids"] for t in texts] == encode(direct, texts)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=direct)
    assert [wrapped(t, add_special_tokens=False)["input_ids"] for t in texts] == encode(direct, texts)
    # the pitfall save_tokenizer avoids: a model-specific class rebuilds the pipeline and drops the patch
    pitfall = tmp_path / "pitfall"
    files.save_tokenizer(result.tokenizer_json, pitfall, smollm2_dir)
    config = json.loads((pitfall / "tokenizer_config.json").read_text())
    (pitfall / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    rebuilt = transformers.AutoTokenizer.from_pretrained(str(pitfall))
    assert [rebuilt(t, add_special_tokens=False)["input_ids"] for t in texts] != encode(direct, texts)


def test_llama3_style_specials_survive_save_and_load(extended, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = extended["llama3"]
    loaded = transformers.AutoTokenizer.from_pretrained(str(files.save_tokenizer(result.tokenizer_json, tmp_path)))
    for t in result.tokenizer_json["added_tokens"]:
        assert loaded.convert_tokens_to_ids(t["content"]) == t["id"]
    assert len(loaded) == max(result.new_token_sources) + 1


# --- combining marks ------------------------------------------------------------------------

def test_attach_marks_is_idempotent_and_changes_only_letters_with_marks(bases):
    base = bases["smollm2"]
    patched, changed = kinds.attach_combining_marks(base)
    again, changed_again = kinds.attach_combining_marks(patched)
    assert changed and not changed_again and again == patched
    p0, p1 = load(base).pre_tokenizer, load(patched).pre_tokenizer
    for lang in ("en", "el", "ru", "tr", "hu", "zh", "ja"):  # not ar: harakat are marks after letters
        for t in corpus()[lang][:100] + ["I ❤️ emoji 👨‍👩‍👧 and ‘quotes’ 12345 "]:
            assert p0.pre_tokenize_str(t) == p1.pre_tokenize_str(t), (lang, t)
    hindi = "के शर्मा के सियासी दबाव"
    assert [s for s, _ in p1.pre_tokenize_str(hindi)] != [s for s, _ in p0.pre_tokenize_str(hindi)]
    assert len(p1.pre_tokenize_str(hindi)) == 5
    assert kinds.attach_combining_marks(bases["llama2"]) == (bases["llama2"], False)  # nothing to do
    l3, changed = kinds.attach_combining_marks(bases["llama3"])
    assert changed and r"\p{L}[\p{L}\p{M}]*" in l3["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]


def test_attach_marks_refuses_when_an_old_language_has_marks():
    """A Llama-3-style base trained on Hindi has tokens that start with a vowel sign (its regex
    lets a mark lead a letter run), so keeping marks with letters changes Hindi ids: refused.
    (SmolLM2's merges never span a letter and a following mark: there it changes no corpus text.)"""
    base = llama3_style_json(("en", "es", "hi"), vocab_size=2000)
    with pytest.raises(VocabError, match=r"^attach_marks would change the tokens of \d+ of \d+ old-language documents \(hi: \d+\), whose letters carry combining marks; extend without it$"):
        extend_tokenizer(base, {"bn": train("bn", 50)}, old_sample(["en", "hi"], 50), 50, attach_marks=True)


# --- budget ---------------------------------------------------------------------------------

def test_reads_lazily_up_to_the_byte_budget(bases):
    pulled = []

    def stream():
        for t in split("hu")[0] * 100:  # "large"
            pulled.append(t)
            yield t

    result = extend_tokenizer(bases["smollm2"], {"hu": stream()}, old_sample(["en"]), 50, max_bytes_per_language=20_000)
    info = result.report.languages["hu"]
    assert info["budget_reached"] and 20_000 <= info["bytes_read"] < 20_000 + max(len(t.encode()) for t in pulled)
    assert len(pulled) == info["docs_read"] + 1


# --- bad input ------------------------------------------------------------------------------

def _json_of(model) -> dict:
    return json.loads(Tokenizer(model).to_str())


BAD_N = [
    (0, "max_new_tokens must be at least 1, got 0"),
    (-5, "max_new_tokens must be at least 1, got -5"),
    (True, "max_new_tokens must be an integer, got True"),
    (2.5, "max_new_tokens must be an integer, got 2.5"),
    (65_537, "max_new_tokens 65537 is above the cap of 65536: every new token is an embedding row to train, and merges that rare cannot be trained"),
]


@pytest.mark.parametrize("n,message", BAD_N)
def test_bad_max_new_tokens(bases, n, message):
    with pytest.raises(VocabError) as error:
        extend_tokenizer(bases["smollm2"], {"hu": ["a b"]}, {"en": ["c"]}, n)
    assert str(error.value) == message


def _bad_tokenizers(bases):
    smol = bases["smollm2"]

    def with_model(**changes):
        j = json.loads(json.dumps(smol))
        j["model"].update(changes)
        return j

    no_fallback = json.loads(json.dumps(bases["llama2"]))
    no_fallback["model"]["byte_fallback"] = False
    return [
        ({"version": "1.0"}, "not a tokenizer.json: no 'model' section (convert tiktoken or SentencePiece .model files to a fast tokenizer first)"),
        (_json_of(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "unsupported tokenizer: a WordPiece model; only BPE (byte-level, or SentencePiece-style with byte_fallback) can be extended"),
        (_json_of(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, False)), "unsupported tokenizer: a Unigram model; only BPE (byte-level, or SentencePiece-style with byte_fallback) can be extended"),
        (with_model(dropout=0.1), "unsupported BPE option dropout=0.1: merges would not mean what plain BPE means"),
        (with_model(continuing_subword_prefix="##"), "unsupported BPE option continuing_subword_prefix='##': merges would not mean what plain BPE means"),
        (with_model(end_of_word_suffix="</w>"), "unsupported BPE option end_of_word_suffix='</w>': merges would not mean what plain BPE means"),
        (no_fallback, "unsupported tokenizer: BPE with neither a ByteLevel pre-tokenizer nor byte_fallback (characters outside its vocab become unknown tokens)"),
    ]


def test_unsupported_tokenizers(bases):
    for tokenizer_json, message in _bad_tokenizers(bases):
        with pytest.raises(VocabError) as error:
            extend_tokenizer(tokenizer_json, {"hu": train("hu", 5)}, {"en": train("en", 5)}, 10)
        assert str(error.value) == message


def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(VocabError) as error:
        kinds.load_tokenizer_json(tmp_path)
    assert str(error.value) == f"no tokenizer.json in {tmp_path} (found tokenizer.model): only fast tokenizers (tokenizer.json) can be extended"


BAD_DATA = [
    ({}, {"en": ["x"]}, {}, "no new-language texts given"),
    ({"hu": []}, {"en": ["x"]}, {}, "new language(s) hu have no text"),
    ({"hu": ["", ""], "tr": ["ok ok"]}, {"en": ["x"]}, {}, "new language(s) hu have no text"),
    ({"hu": ["x"]}, {}, {}, "no old-language check texts given: without them nothing protects the old languages"),
    ({"hu": ["x"]}, {"en": []}, {}, "no old-language check texts given: without them nothing protects the old languages"),
    ({"en": ["x"]}, {"en": ["y"]}, {}, "language(s) en given as both new and old"),
    ({"hu": ["x"]}, {"en": ["y"]}, {"max_bytes_per_language": 0}, "max_bytes_per_language must be a positive integer, got 0"),
    ({"hu": ["x"]}, {"en": ["y"]}, {"min_pair_count": 1}, "min_pair_count must be an integer of at least 2, got 1"),
    ({"hu": ["Szia"]}, {"en": ["Hello"]}, {}, "nothing to learn: no token pair occurs at least 2 times in the new-language text that the old languages allow; give more text"),
]


@pytest.mark.parametrize("new,old,kwargs,message", BAD_DATA)
def test_bad_data(bases, new, old, kwargs, message):
    with pytest.raises(VocabError) as error:
        extend_tokenizer(bases["smollm2"], new, old, 100, **kwargs)
    assert str(error.value) == message


def test_too_little_data_learns_what_exists_and_says_so(bases):
    result = extend_tokenizer(bases["smollm2"], {"hu": train("hu", 20)}, old_sample(["en"]), 5000)
    k = result.report.new_tokens
    assert 0 < k < 5000
    assert result.report.stop_reason == f"learned {k} of 5000: no other pair occurs at least 2 times in the new-language text that the old languages allow"
    assert re.fullmatch(r"reached max_new_tokens \(10\)", extend_tokenizer(
        bases["smollm2"], {"hu": train("hu", 20)}, old_sample(["en"]), 10).report.stop_reason)


# --- the learner's bookkeeping --------------------------------------------------------------

def test_incremental_pair_counts_match_a_recount(bases):
    """After learning, the incrementally kept pair counts equal a recount over the final words,
    and each final word is what the real extended model makes of it."""
    base = bases["smollm2"]
    info = kinds.describe_tokenizer(base)
    tok = load(base)
    texts = train("hu", 100) + ["aaaa aaaaa ababab " * 3]  # runs of one pair: the tricky case
    counts = counting.count_words(tok, info, texts, 10**9)
    learner = extension._learner(tok, info, ["hu"], {"hu": counts}, old_sample(["en"], 50), 2)
    learned = learner.learn(300)
    recount = Counter()
    for word, n in zip(learner.words, learner.counts):
        for pair in zip(word, word[1:]):
            recount[pair] += n
    assert +Counter(learner.pair_counts) == recount
    extended_json = learning.extended_tokenizer_json(base, info, learned, learner.strings)
    bare = counting.model_only_tokenizer(tokenizer_from_json(extended_json))
    strings = learner.strings
    for word in learner.words[:2000]:
        assert bare.encode("".join(strings[i] for i in word), add_special_tokens=False).ids == word


def test_digits_stay_single_where_the_base_never_merges_them(bases, extended):
    """SmolLM2 spells every number digit by digit; a merged "75" learned from new-language text
    would change old-language numbers that the check sample happens not to contain."""
    assert not kinds.describe_tokenizer(bases["smollm2"]).shape.digits_merge
    texts = [f"{t} {n} {n * 7}" for n, t in enumerate(train("hi", 150), start=1000)]  # plenty of numbers
    result = extend_tokenizer(bases["smollm2"], {"hi": texts}, old_sample(["en"], 50), 300)
    assert result.report.rejected.get(kinds.R_SHAPE, 0) > 0
    assert not any(ch.isdecimal() for t in result.new_tokens for ch in kinds.token_text(t.string, True))
    b, e = load(bases["smollm2"]), load(result.tokenizer_json)
    numbers = ["In 1975 there were 36,412 of them; by 2031, 8,765,432."]
    assert encode(b, numbers) == encode(e, numbers)
    assert kinds.describe_tokenizer(bases["llama3"]).shape.digits_merge  # Llama 3 merges up to 3 digits
