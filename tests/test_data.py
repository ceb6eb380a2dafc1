"""Language codes, data sources, their errors, and the held-out split."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from layermoe.core.errors import LayermoeError
from layermoe.data import (
    builtin_corpus_path,
    builtin_languages,
    describe_source,
    is_heldout,
    load_documents,
    load_texts,
    parse_data_args,
    source_kind,
)
from layermoe.data.languages import base_language, parse_language_list, validate_language
from layermoe.data.split import _split_fixup, _unit_hash

UNKNOWN_TAIL = "use an ISO 639-1 or 639-3 code such as el, hu, tur (optionally with a script, e.g. zh-Hans)"


# --------------------------------------------------------------------------- languages


@pytest.mark.parametrize(
    "code, expected",
    [("en", "en"), ("eng", "en"), ("tur", "tr"), ("ell", "el"), ("HU", "hu"), ("zh-hans", "zh-Hans"),
     ("sr_Latn", "sr-Latn"), ("sr-Latn", "sr-Latn"), ("ne", "ne"), ("quc", "quc"), ("tl", "fil")],
)
def test_validate_language_normalises(code, expected):
    assert validate_language(code) == expected


@pytest.mark.parametrize("code", ["xx", "zz", "und", "qaa", "x-foo", "english", "", "e n", "123"])
def test_validate_language_rejects(code):
    with pytest.raises(LayermoeError) as err:
        validate_language(code)
    assert str(err.value) == f"unknown language code {code!r}: {UNKNOWN_TAIL}"


def test_base_language():
    assert base_language("zh-Hans") == "zh"
    assert base_language("sr-Latn") == "sr"
    assert base_language("tur") == "tr"


def test_parse_language_list():
    assert parse_language_list("en,zh,es") == ["en", "zh", "es"]
    assert parse_language_list(" ell , hun,tur ") == ["el", "hu", "tr"]
    with pytest.raises(LayermoeError) as err:
        parse_language_list("en,tr,tur")
    assert str(err.value) == "language 'tr' is listed twice in 'en,tr,tur': list each language once"
    with pytest.raises(LayermoeError) as err:
        parse_language_list("en,,zh")
    assert str(err.value) == "bad language list 'en,,zh': give comma-separated codes such as en,zh,es"
    with pytest.raises(LayermoeError, match="unknown language code 'xx'"):
        parse_language_list("en,xx")


def test_parse_data_args():
    assert parse_data_args(["ell=greek.txt", "hu = builtin", "zh=hf:a/b:c:train"]) == {
        "el": "greek.txt",
        "hu": "builtin",
        "zh": "hf:a/b:c:train",
    }
    assert parse_data_args(["el=dir/a=b.txt"]) == {"el": "dir/a=b.txt"}  # only the first '=' splits
    for bad in ["greek.txt", "el=", "=x.txt"]:
        with pytest.raises(LayermoeError) as err:
            parse_data_args([bad])
        assert str(err.value) == f"bad --data {bad!r}: write LANG=SPEC, e.g. el=greek.txt or hu=builtin"
    with pytest.raises(LayermoeError) as err:
        parse_data_args(["el=a.txt", "ell=b.txt"])
    assert str(err.value) == "--data gives language 'el' twice: give one source per language"
    with pytest.raises(LayermoeError, match="unknown language code 'xx'"):
        parse_data_args(["xx=a.txt"])


# --------------------------------------------------------------------------- formats


def _write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_txt_skips_blank_lines_and_keeps_order(tmp_path):
    f = _write(tmp_path / "el.txt", "Καλημέρα κόσμε\n\n   \nδεύτερο κείμενο\r\ntrois\n")
    assert load_texts("el", str(f), cache_dir=tmp_path / "cache") == ["Καλημέρα κόσμε", "δεύτερο κείμενο", "trois"]


def test_txt_documents_are_the_lines_datasets_makes(tmp_path):
    """The same documents as `datasets`' text builder (which read .txt before), so the same held-out split."""
    import datasets

    from layermoe.data.sources import Source, iter_documents

    f = _write(tmp_path / "x.txt", "\ufeffone\r\ntwo\rthree\u2028still three\x0cand\x85more\n\n  \n  spaced  \r\n\rlast")
    rows = datasets.load_dataset("text", data_files=[str(f)], split="train", cache_dir=str(tmp_path / "c"))["text"]
    expected = [t for t in rows if t.strip()]
    assert len(expected) == 5
    assert list(iter_documents(Source("el", str(f)), chunk_bytes=5)) == expected  # tiny chunks: lines cross them
    assert load_texts("el", str(f)) == expected


def test_jsonl_json_and_text_field(tmp_path):
    rows = [{"text": "alpha", "body": "uno"}, {"text": "", "body": "dos"}, {"text": "gamma", "body": " "}]
    jsonl = _write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    array = _write(tmp_path / "a.json", json.dumps(rows))
    cache = tmp_path / "cache"
    assert load_texts("hu", str(jsonl), cache_dir=cache) == ["alpha", "gamma"]
    assert load_texts("hu", str(array), cache_dir=cache) == ["alpha", "gamma"]
    assert load_texts("hu", str(jsonl), cache_dir=cache, text_field="body") == ["uno", "dos"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "tr.parquet"
    pq.write_table(pa.table({"text": ["bir", "", "iki"], "id": [1, 2, 3]}), f)
    assert load_texts("tr", str(f), cache_dir=tmp_path / "cache") == ["bir", "iki"]
    with pytest.raises(LayermoeError) as err:
        load_texts("tr", str(f), cache_dir=tmp_path / "cache", text_field="content")
    assert str(err.value) == (
        f"data for 'tr': {f} has no field 'content' (fields: id, text): rename the field or choose another text field"
    )


def test_directory_of_mixed_files_in_path_order(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    _write(d / "b.txt", "from b\n")
    _write(d / "a.jsonl", '{"text": "from a"}\n')
    _write(d / "sub" / "c.txt", "from c\n")
    _write(d / "notes.md", "ignored\n")
    _write(d / ".hidden.txt", "ignored too\n")
    assert load_texts("el", str(d), cache_dir=tmp_path / "cache") == ["from a", "from b", "from c"]
    assert source_kind(str(d)) == "dir"


def test_streaming_gives_the_same_documents(tmp_path):
    f = _write(tmp_path / "a.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    eager = load_texts("el", str(f), cache_dir=tmp_path / "cache", streaming=False)
    streamed = load_texts("el", str(f), cache_dir=tmp_path / "cache", streaming=True)
    assert eager == streamed == [f"doc {i}" for i in range(50)]


def test_reading_writes_no_copy_of_the_text(tmp_path):
    f = _write(tmp_path / "a.txt", "one\ntwo\n")
    cache = tmp_path / "cache"
    assert load_texts("el", str(f), cache_dir=cache) == ["one", "two"]
    assert not cache.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# --------------------------------------------------------------------------- bad input


def _error(lang, spec, **kwargs) -> str:
    with pytest.raises(LayermoeError) as err:
        load_texts(lang, spec, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    spec = str(tmp_path / "nope.txt")
    assert _error("el", spec) == f"data for 'el': file not found: {spec}"


def test_empty_files(tmp_path):
    blank = _write(tmp_path / "blank.txt", "\n  \n\t\n")
    assert _error("el", str(blank)) == f"data for 'el': {blank} has no non-blank document"
    zero = _write(tmp_path / "zero.jsonl", "")
    assert _error("hu", str(zero)) == f"data for 'hu': {zero} has no non-blank document"
    empty_texts = _write(tmp_path / "e.jsonl", '{"text": ""}\n{"text": "  "}\n')
    assert _error("hu", str(empty_texts), cache_dir=tmp_path / "c") == (
        f"data for 'hu': {empty_texts} has no non-blank document"
    )


def test_non_utf8_names_the_offset(tmp_path):
    f = _write(tmp_path / "latin1.txt", "good line\ncaf".encode() + "é\n".encode("latin-1"))
    assert _error("el", str(f)) == (
        f"data for 'el': {f} is not valid UTF-8 (first bad byte at offset 13): re-encode it as UTF-8"
    )
    # A file cut in the middle of a multi-byte character: the offset is where the character starts.
    g = _write(tmp_path / "cut.txt", "αβ".encode() + "γ".encode()[:1])
    assert _error("el", str(g)) == (
        f"data for 'el': {g} is not valid UTF-8 (first bad byte at offset 4): re-encode it as UTF-8"
    )


def test_non_utf8_across_chunk_boundary(tmp_path, monkeypatch):
    import layermoe.data.sources as sources

    monkeypatch.setattr(sources, "_CHUNK", 3)  # 'α' (2 bytes) straddles the chunk boundary at 3 of the checksum scan
    f = _write(tmp_path / "x.txt", "aα".encode() + b"b\xffc")
    assert _error("el", str(f)) == (
        f"data for 'el': {f} is not valid UTF-8 (first bad byte at offset 4): re-encode it as UTF-8"
    )


def test_json_without_text_field(tmp_path):
    f = _write(tmp_path / "a.jsonl", '{"content": "x", "id": 1}\n')
    assert _error("el", str(f), cache_dir=tmp_path / "c") == (
        f"data for 'el': {f} has no field 'text' (fields: content, id): rename the field or choose another text field"
    )


def test_malformed_json_names_file_and_line(tmp_path):
    f = _write(tmp_path / "a.jsonl", '{"text": "ok"}\n{not json\n')
    assert _error("el", str(f), cache_dir=tmp_path / "c") == (
        f"data for 'el': {f} line 2 is not valid JSON (Expecting property name enclosed in double quotes at column 2): "
        "fix or remove that line"
    )
    # line numbers count across the reader's chunks, blank lines included
    from layermoe.data.sources import Source, iter_documents

    g = _write(tmp_path / "b.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300)) + "\n[1, 2]\n")
    with pytest.raises(LayermoeError) as err:
        list(iter_documents(Source("el", str(g)), chunk_bytes=64))
    assert str(err.value) == f"data for 'el': {g} line 302 is a JSON list, not an object: write one JSON object per line"


def test_unreadable_file_in_a_directory_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    d.mkdir()
    _write(d / "a.txt", "fine\n")
    (d / "b.txt").symlink_to(tmp_path / "gone.txt")
    assert _error("el", str(d)) == f"data for 'el': cannot read {d / 'b.txt'} in {d}: it is a link to a missing file"
    (d / "b.txt").unlink()
    pq.write_table(pa.table({"text": ["x"]}), d / "c.parquet")
    (d / "c.parquet").write_bytes((d / "c.parquet").read_bytes()[:-20])  # cut: not a parquet file any more
    message = _error("el", str(d))
    assert message.startswith(f"data for 'el': could not read {d / 'c.parquet'}: ") and "Parquet" in message


def test_unknown_extension(tmp_path):
    f = _write(tmp_path / "a.csv", "text\nx\n")
    assert _error("el", str(f)) == (
        f"data for 'el': unsupported file type '.csv' for {f}: use .txt, .jsonl, .json, .parquet, "
        "a directory of those, hf:NAME[:CONFIG[:SPLIT]] or builtin"
    )


def test_directory_without_usable_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "readme.md", "x")
    assert _error("el", str(d)) == f"data for 'el': directory {d} has no .txt, .jsonl, .json, .parquet files"


def test_hf_source_is_streamed(tmp_path):
    """`hf:` goes through `datasets` in streaming mode; a local dataset folder stands in for the hub."""
    d = tmp_path / "ds"
    d.mkdir()
    _write(d / "train.jsonl", "".join(json.dumps({"text": f"doc {i}", "n": i}) + "\n" for i in range(2500)))
    assert load_texts("el", f"hf:{d}") == [f"doc {i}" for i in range(2500)]  # three batches of 1024
    assert load_texts("el", f"hf:{d}", limit=3) == ["doc 0", "doc 1", "doc 2"]
    assert _error("el", f"hf:{d}", text_field="body") == (
        f"data for 'el': hf:{d} has no field 'body' (fields: n, text): rename the field or choose another text field"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"] and sorted(p.name for p in d.iterdir()) == ["train.jsonl"]


def test_hf_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    message = _error("el", "hf:no-such-owner/no-such-dataset-xyz", cache_dir=tmp_path / "c")
    assert message.startswith("data for 'el': could not load hf:no-such-owner/no-such-dataset-xyz (")
    assert message.endswith(
        "it needs the Hugging Face hub or its local cache: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
        "or pass a local file"
    )
    assert _error("el", "hf:") == "bad data source 'hf:' for 'el': write hf:NAME[:CONFIG[:SPLIT]]"


# --------------------------------------------------------------------------- builtin


def _corpus_lines(code):
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f if line.startswith(code + "\t")]


@pytest.mark.parametrize("lang", ["en", "el"])
def test_builtin_matches_the_raw_corpus(lang):
    expected = [t for t in _corpus_lines(lang) if t.strip()]
    assert len(expected) == 1000
    assert load_texts(lang) == expected
    assert load_texts("ell" if lang == "el" else "eng", "builtin") == expected
    info = describe_source(lang, "builtin")
    assert info == {
        "language": lang,
        "spec": "builtin",
        "kind": "builtin",
        "sha256": hashlib.sha256("\n".join(expected).encode()).hexdigest(),
        "num_documents": 1000,
    }


def test_builtin_script_suffix_and_renamed_codes():
    assert load_texts("zh-Hans", limit=3) == _corpus_lines("zh")[:3]
    assert load_texts("tl", limit=2) == _corpus_lines("tl")[:2]  # `tl` is normalised to `fil`
    langs = builtin_languages()
    assert len(langs) == 60 and {"en", "el", "hu", "tr", "bn", "hi", "zh", "es", "fil"} <= set(langs)


def test_builtin_missing_language_lists_some_present():
    message = _error("ne", "builtin")
    assert message == (
        "language 'ne' is not in the builtin corpus: pass --data ne=FILE "
        "(builtin has am, ar, az, be, bg, bn, ca, cs, da, de, el, en and 48 more)"
    )


# --------------------------------------------------------------------------- describe_source


def test_describe_file_and_directory(tmp_path):
    f = _write(tmp_path / "a.txt", "one\n\ntwo\n")
    info = describe_source("ell", str(f), cache_dir=tmp_path / "c")
    assert info == {
        "language": "el",
        "spec": str(f),
        "kind": "txt",
        "sha256": hashlib.sha256(b"one\n\ntwo\n").hexdigest(),
        "num_documents": 2,
    }
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "x.txt", "x1\nx2\n")
    _write(d / "y.jsonl", '{"text": "y"}\n')
    before = describe_source("el", str(d), cache_dir=tmp_path / "c")
    x_sha = hashlib.sha256(b"x1\nx2\n").hexdigest()
    y_sha = hashlib.sha256(b'{"text": "y"}\n').hexdigest()
    expected = hashlib.sha256(f"x.txt\0{x_sha}\ny.jsonl\0{y_sha}\n".encode()).hexdigest()
    assert before["kind"] == "dir" and before["num_documents"] == 3 and before["sha256"] == expected
    _write(d / "y.jsonl", '{"text": "z"}\n')
    assert describe_source("el", str(d), cache_dir=tmp_path / "c")["sha256"] != expected
    hf = describe_source("el", "hf:owner/name:cfg")
    assert hf["kind"] == "hf" and hf["sha256"] == hashlib.sha256(b"hf:owner/name:cfg").hexdigest()


# --------------------------------------------------------------------------- held-out split


def _reference_heldout(text, fraction):
    value = int(hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest(), 16)
    return value < fraction * 2**64


def test_is_heldout_matches_the_documented_rule():
    texts = _corpus_lines("hu")[:300]
    for text in texts:
        assert is_heldout(text) == _reference_heldout(text, 0.05)
        assert is_heldout(text, 0.5) == _reference_heldout(text, 0.5)
    # a few are held out, most are not
    assert 0 < sum(is_heldout(t) for t in texts) < 60


def test_split_is_disjoint_complete_and_order_independent(tmp_path):
    texts = [t for t in _corpus_lines("el") if t.strip()]
    train, heldout = load_texts("el", split="train"), load_texts("el", split="heldout")
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(texts)
    assert set(heldout) == {t for t in texts if _reference_heldout(t, 0.05)}
    # the same documents in another order, from a file: the same split
    f = _write(tmp_path / "rev.txt", "\n".join(reversed(texts)) + "\n")
    assert set(load_texts("el", str(f), split="heldout", cache_dir=tmp_path / "c")) == set(heldout)
    assert load_texts("el", split="heldout") == heldout  # and again: deterministic


def test_split_fixup_guarantees_one_document_each_side(tmp_path):
    texts = [f"document number {i}" for i in range(4)]
    hashes = [_unit_hash(t) for t in texts]
    # fraction below every hash: nothing would be held out, so the smallest hash is
    fraction = min(hashes) / 2
    f = _write(tmp_path / "a.txt", "\n".join(texts) + "\n")
    held = load_texts("el", str(f), split="heldout", fraction=fraction, cache_dir=tmp_path / "c")
    train = load_texts("el", str(f), split="train", fraction=fraction, cache_dir=tmp_path / "c")
    assert held == [texts[hashes.index(min(hashes))]]
    assert sorted(train + held) == sorted(texts)
    # fraction above every hash: everything would be held out, so the largest hash trains
    held = load_texts("el", str(f), split="heldout", fraction=1.0, cache_dir=tmp_path / "c")
    train = load_texts("el", str(f), split="train", fraction=1.0, cache_dir=tmp_path / "c")
    assert train == [texts[hashes.index(max(hashes))]]
    assert sorted(train + held) == sorted(texts)
    # one distinct document (even repeated) cannot be split
    assert _split_fixup(["same", "same"], 0.0) == (None, None)
    assert _split_fixup(["a", "b"], 0.0) == (min("ab", key=_unit_hash), None)


def test_load_documents_rejects_bad_split():
    with pytest.raises(ValueError, match=re.escape("split must be train, heldout or all, not 'test'")):
        load_documents("en", "builtin", split="test")
