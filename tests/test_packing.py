"""Prepared data and packing against a simple reference: same documents, blocks and labels."""

import hashlib
import json

import numpy as np
import pytest

from layermoe.core.errors import LayermoeError
from layermoe.data import DataSelection, PackedData, Source, block_indices, builtin_corpus_path, load_texts, prepare
from layermoe.data.tokenize import id_dtype
from layermoe.testing import make_tiny_tokenizer

IGNORE = -100
GENS = {"en": 0, "el": 1, "hu": 1}


def _corpus_lines(code):
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if line.startswith(code + "\t")]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture()
def files(tmp_path):
    """el as .txt (with blank and \\r\\n lines), hu as .jsonl (with blank lines), en from builtin."""
    el = tmp_path / "el.txt"
    el.write_bytes(("\n\n".join(_corpus_lines("el")[:300]) + "\r\nlast line without newline").encode())
    hu = tmp_path / "hu.jsonl"
    hu.write_text("".join(json.dumps({"text": t, "id": i}) + ("\n\n" if i % 7 == 0 else "\n")
                          for i, t in enumerate(_corpus_lines("hu")[:300])), encoding="utf-8")
    return {"el": Source("el", str(el)), "hu": Source("hu", str(hu)), "en": Source("en", "builtin")}


# ---------------------------------------------------------------- the slow, obvious reference


def reference_ids(tok, texts):
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids = ids + [tok.eos_token_id]
        out.append(ids)
    return out


def reference_choice(documents, language, seed, buffer_size, max_docs=None, max_tokens=None):
    """The documented shuffle buffer, one document at a time, on plain lists."""
    digest = int.from_bytes(hashlib.sha256(language.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, digest])
    buffer, out = [], []

    def full():
        return (max_docs is not None and len(out) >= max_docs) or (max_tokens is not None and sum(map(len, out)) >= max_tokens)

    for document in documents:
        if len(buffer) < buffer_size:
            buffer.append(document)
            continue
        slot = int(rng.integers(buffer_size))
        out.append(buffer[slot])
        buffer[slot] = document
        if full():
            return out
    for slot in rng.permutation(len(buffer)):
        out.append(buffer[slot])
        if full():
            return out
    return out


def reference_blocks(documents_by_language, seq_len, pad_id, seed):
    """Documents language by language, shuffled by default_rng(seed), one stream, cut into blocks."""
    docs = [(ids, li, GENS[lang]) for li, (lang, docs) in enumerate(documents_by_language.items()) for ids in docs]
    stream = []
    for k in np.random.default_rng(seed).permutation(len(docs)):
        ids, li, gen = docs[k]
        stream += [(t, gen, li) for t in ids]
    blocks = []
    for start in range(0, len(stream), seq_len):
        piece = stream[start:start + seq_len]
        piece += [(pad_id, IGNORE, -1)] * (seq_len - len(piece))
        blocks.append(piece)
    return np.array(blocks, dtype=np.int64)  # [B, L, 3]


def as_triples(data: PackedData) -> np.ndarray:
    arrays = data.arrays(range(len(data)))
    return np.stack([arrays["input_ids"], arrays["generation"], arrays["language"]], axis=-1)


# ---------------------------------------------------------------- equality


def test_stage1_every_document_equals_the_reference(tmp_path, tok, files):
    prepared = prepare(files, GENS, 1, DataSelection(stage=1, seed=7), tok, tmp_path / "prep", num_proc=2, chunk_bytes=512,
                       show_progress=False)
    expected = {lang: reference_ids(tok, load_texts(lang, files[lang].spec, "train")) for lang in ("el", "hu")}
    assert prepared.languages == ["el", "hu"]
    assert prepared.documents_per_language == {lang: len(docs) for lang, docs in expected.items()}
    assert len(expected["el"]) > 250 and len(expected["hu"]) > 250  # 5% held out, blank lines skipped
    for seq_len in (16, 7):  # one prepared directory serves any block length
        data = PackedData(prepared, seq_len, pad_id=1)
        assert np.array_equal(as_triples(data), reference_blocks(expected, seq_len, 1, seed=7))
        batch = data.batch([len(data) - 1, 0])
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
        assert data.real_tokens([len(data) - 1, 0]).tolist() == batch["attention_mask"].sum(1).tolist()


def test_stage2_budgets_choose_what_the_reference_chooses_and_stop_reading(tmp_path, tok, files):
    selection = DataSelection(stage=2, seed=3, docs_per_new_language=40, tokens_per_old_language=700, shuffle_buffer=16)
    prepared = prepare(files, GENS, 1, selection, tok, tmp_path / "prep", num_proc=1, chunk_bytes=256, show_progress=False)
    expected = {}
    for lang in ("el", "hu"):
        train = reference_ids(tok, load_texts(lang, files[lang].spec, "train"))
        expected[lang] = reference_choice(train, lang, 3, 16, max_docs=40)
    expected["en"] = reference_choice(reference_ids(tok, load_texts("en", "builtin", "train")), "en", 3, 16, max_tokens=700)
    assert prepared.languages == ["el", "hu", "en"]  # new languages first: the replay depends on them
    assert [len(expected[lang]) for lang in prepared.languages] == [40, 40, len(expected["en"])]
    assert np.array_equal(as_triples(PackedData(prepared, 32, pad_id=1)), reference_blocks(expected, 32, 1, seed=3))
    # the budget stopped the reading: about (40 + 16) / 0.95 documents and a chunk, of 300 in each file
    stats = {s["language"]: s for s in prepared.meta["stats"]}
    for lang in ("el", "hu"):
        assert stats[lang]["budget_met"] and not stats[lang]["read_to_end"]
        assert stats[lang]["documents_read"] < 80, stats[lang]
        assert stats[lang]["bytes_read"] < 0.3 * stats[lang]["source_bytes"]


def test_a_budget_is_deterministic_for_a_seed(tmp_path, tok, files):
    def chosen(seed, root):
        prepared = prepare({"el": files["el"]}, GENS, 1, DataSelection(stage=1, seed=seed, tokens_per_language=2000,
                                                                   shuffle_buffer=32), tok, root, num_proc=1,
                           show_progress=False)
        return prepared.tokens.tobytes()

    first = chosen(5, tmp_path / "a")
    assert chosen(5, tmp_path / "b") == first
    assert chosen(6, tmp_path / "c") != first


# ---------------------------------------------------------------- storage


def test_ids_are_uint16_up_to_65536_entries_and_uint32_above(tmp_path, tok):
    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert id_dtype(Sized(65_536)) == np.uint16 and id_dtype(Sized(65_537)) == np.uint32
    prepared = prepare({"el": Source("el", texts=["καλημέρα"])}, GENS, 1, DataSelection(stage=1), tok, tmp_path / "a",
                       num_proc=1, show_progress=False)
    assert prepared.meta["dtype"] == "uint16" and prepared.tokens.dtype == np.uint16
    big = make_tiny_tokenizer()
    big.add_tokens([f"<x{i}>" for i in range(65_100)])
    prepared = prepare({"el": Source("el", texts=["a <x65099> b"])}, GENS, 1, DataSelection(stage=1), big, tmp_path / "b",
                       num_proc=1, show_progress=False)
    assert prepared.meta["dtype"] == "uint32"
    assert prepared.tokens.tolist() == reference_ids(big, ["a <x65099> b"])[0]
    assert max(prepared.tokens.tolist()) >= 65_536
    # the cache: the ids plus 8 bytes per document (length, packing order), nothing per token
    size = sum(f.stat().st_size for f in prepared.path.iterdir() if f.name != "meta.json")
    assert (prepared.path / "tokens.bin").stat().st_size == 4 * prepared.num_tokens
    assert size <= 4 * prepared.num_tokens + 8 + 2 * 128  # two .npy headers


def test_unknown_or_too_new_generations_are_refused(tmp_path, tok):
    with pytest.raises(LayermoeError, match=r"^no generation given for language\(s\) xx; add them to generation_of_language$"):
        prepare({"xx": Source("xx", texts=["a"])}, {}, 1, DataSelection(stage=1), tok, tmp_path)
    with pytest.raises(LayermoeError, match=r"belong to a generation after the current one \(1\)"):
        prepare({"bn": Source("bn", texts=["a"]), "el": Source("el", texts=["b"])}, {"bn": 2, "el": 1}, 1,
                DataSelection(stage=1), tok, tmp_path)
    with pytest.raises(LayermoeError, match=r"^no training text for any language of generation 1"):
        prepare({"en": Source("en", texts=["a"])}, {"en": 0}, 1, DataSelection(stage=2), tok, tmp_path)


def test_block_indices_visit_every_block_once_per_epoch_and_resume_exactly():
    stream = block_indices(0, 30, 7, seed=5)
    for epoch in range(4):
        chunk = stream[epoch * 7 : (epoch + 1) * 7]
        if len(chunk) == 7:
            assert sorted(chunk.tolist()) == list(range(7))
    assert np.array_equal(block_indices(12, 9, 7, seed=5), stream[12:21])
    assert not np.array_equal(block_indices(0, 7, 7, seed=6), stream[:7])
