"""Training data: document choice, packing with aligned per-token labels, caching, order."""

import numpy as np
import pytest

from layermoe_cli.errors import LayermoeError
from layermoe_cli.testing import make_tiny_tokenizer
from layermoe_cli.training.config import TrainConfig
from layermoe_cli.training.losses import IGNORE
from layermoe_cli.training.packing import block_indices, build_packed_data, pack_blocks, select_documents


def test_pack_blocks_keeps_labels_aligned_and_pads_the_last_block():
    docs = [([10, 11, 12], 0, 0), ([20, 21, 22, 23, 24], 1, 1), ([30], 0, 2), ([40, 41], 1, 1)]
    blocks = list(pack_blocks(docs, seq_len=4, pad_id=99))
    # Slow reference: one token at a time.
    stream = [(t, g, l) for ids, g, l in docs for t in ids]
    assert len(blocks) == 3  # 11 tokens -> 2 full blocks + 1 padded
    for b, (ids, gens, langs) in enumerate(blocks):
        for j in range(4):
            i = b * 4 + j
            if i < len(stream):
                assert (ids[j], gens[j], langs[j]) == stream[i]
            else:
                assert (ids[j], gens[j], langs[j]) == (99, IGNORE, -1)


def test_pack_blocks_exact_multiple_has_no_padding_block():
    blocks = list(pack_blocks([([1, 2], 0, 0), ([3, 4], 1, 1)], seq_len=2, pad_id=0))
    assert [b[0].tolist() for b in blocks] == [[1, 2], [3, 4]]
    assert [b[1].tolist() for b in blocks] == [[0, 0], [1, 1]]


def _texts(n, lang):
    return [f"{lang} document number {i} " + "word " * (i % 5) for i in range(n)]


def test_select_documents_stage1_new_only_and_stage2_replay_half():
    texts = {"en": _texts(40, "en"), "es": _texts(40, "es"), "el": _texts(30, "el"), "hu": _texts(10, "hu")}
    gens = {"en": 0, "es": 0, "el": 1, "hu": 1}
    s1 = select_documents(texts, gens, 1, TrainConfig(stage=1))
    assert sorted(s1) == ["el", "hu"] and len(s1["el"]) == 30 and len(s1["hu"]) == 10
    s2 = select_documents(texts, gens, 1, TrainConfig(stage=2, docs_per_new_language=20))
    assert len(s2["el"]) == 20 and len(s2["hu"]) == 10
    assert len(s2["en"]) == 8 and len(s2["es"]) == 8  # 0.5 x mean(20, 10) = 7.5 -> 8
    assert set(s2["en"]) <= set(texts["en"])
    again = select_documents(texts, gens, 1, TrainConfig(stage=2, docs_per_new_language=20))
    assert again == s2  # deterministic for a seed
    explicit = select_documents(texts, gens, 1, TrainConfig(stage=2, docs_per_old_language=3))
    assert len(explicit["en"]) == 3


def test_select_documents_rejects_bad_generations():
    with pytest.raises(LayermoeError, match=r"^no generation given for language\(s\) xx; add them to generation_of_language$"):
        select_documents({"xx": ["a"]}, {}, 1, TrainConfig(stage=1))
    with pytest.raises(LayermoeError, match=r"belong to a generation after the current one \(1\)"):
        select_documents({"bn": ["a"], "el": ["b"]}, {"bn": 2, "el": 1}, 1, TrainConfig(stage=1))
    with pytest.raises(LayermoeError, match=r"^no training text for any language of generation 1"):
        select_documents({"en": ["a"]}, {"en": 0}, 1, TrainConfig(stage=2))


def test_build_packed_data_labels_match_each_documents_language(tmp_path):
    tok = make_tiny_tokenizer()
    docs = {"en": ["the cat sat on the mat", "hello world"], "el": ["γειά σου κόσμε", "καλημέρα"]}
    data = build_packed_data(docs, {"en": 0, "el": 1}, tok, seq_len=8, seed=3, cache_dir=tmp_path)
    batch = data.batch(range(len(data)))
    ids, gen, lang = (batch[k].reshape(-1).tolist() for k in ("input_ids", "generation", "language"))
    # Re-split the stream at EOS and check every document came through whole with its labels.
    eos = tok.eos_token_id
    found = {}
    start = 0
    for i, t in enumerate(ids):
        if t == eos and lang[i] >= 0:
            seg = slice(start, i)
            code = data.languages[lang[i]]
            assert set(lang[seg]) == {lang[i]} and set(gen[seg]) == {data.generation_of_language[code]}
            found.setdefault(code, []).append(tok.decode(ids[seg]))
            start = i + 1
    assert sorted(found["en"]) == sorted(docs["en"]) and sorted(found["el"]) == sorted(docs["el"])
    mask = batch["attention_mask"].reshape(-1)
    assert (batch["labels"].reshape(-1)[mask == 0] == IGNORE).all()
    assert int(mask.sum()) == sum(data.tokens_per_language.values())
    # second build hits the cache and gives the same blocks
    again = build_packed_data(docs, {"en": 0, "el": 1}, tok, seq_len=8, seed=3, cache_dir=tmp_path)
    assert again.batch(range(len(again)))["input_ids"].equal(batch["input_ids"])
    assert len(list(tmp_path.glob("packed-*.arrow"))) == 1


def test_block_indices_visit_every_block_once_per_epoch_and_resume_exactly():
    stream = block_indices(0, 30, 7, seed=5)
    for epoch in range(4):
        chunk = stream[epoch * 7 : (epoch + 1) * 7]
        if len(chunk) == 7:
            assert sorted(chunk.tolist()) == list(range(7))
    assert np.array_equal(block_indices(12, 9, 7, seed=5), stream[12:21])
    assert not np.array_equal(block_indices(0, 7, 7, seed=6), stream[:7])
