"""`expand --new-tokens N` and `extend --new-tokens N` through the pipeline, on a tiny model: the old
languages keep their tokens, the new rows start as their definition and train in stage 1 only, every
old row is bit-identical after both stages, and everything downstream reads the new tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.testing import make_tiny_model

runner = CliRunner()
STAGE = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "0", "--report-to", "none"]


def layermoe(workdir: Path, *args: str, code: int = 0):
    result = runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "250"})
    assert result.exit_code == code, (args, result.output[-3000:])
    return result


def _embedding(checkpoint: Path) -> torch.Tensor:
    tensors = {}
    for path in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(str(path)))
    return tensors["lm.model.embed_tokens.weight"]


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """G1 = el (Greek: its own script) after G0 = en, with 40 new tokens, trained through both stages."""
    root = tmp_path_factory.mktemp("vocab")
    tiny = make_tiny_model(root / "tiny", "llama", num_layers=2, shared_direction=2.0, tie_word_embeddings=True)
    workdir = root / "run"
    layermoe(workdir, "profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "400", "--neuron-top-n", "0")
    layermoe(workdir, "allocate", "--budget", "4", "--classifier-layers", "1")
    layermoe(workdir, "expand", "--new-tokens", "40")
    expanded = _embedding(workdir / "g1" / "expanded")
    layermoe(workdir, "train", "--stage", "1", *STAGE, "--lr", "1e-2")
    layermoe(workdir, "train", "--stage", "2", *STAGE)
    return {"root": root, "tiny": tiny, "workdir": workdir, "expanded": expanded}


def test_old_language_text_keeps_its_tokens_and_new_text_gets_new_ones(extended):
    from layermoe.data import builtin_corpus_path, load_texts

    assert builtin_corpus_path().is_file()
    base = AutoTokenizer.from_pretrained(extended["tiny"])
    new = AutoTokenizer.from_pretrained(extended["workdir"] / "g1" / "expanded")
    assert len(new) == len(base) + 40
    english = load_texts("en", "builtin", split="all")
    assert [base(t)["input_ids"] for t in english] == [new(t)["input_ids"] for t in english]
    greek = load_texts("el", "builtin", split="heldout")
    assert sum(len(new(t)["input_ids"]) for t in greek) < sum(len(base(t)["input_ids"]) for t in greek)
    assert all(new.decode(new(t)["input_ids"], skip_special_tokens=True) == t for t in greek)  # round trip


def test_the_step_is_recorded_with_its_report_and_the_old_languages_drift(extended):
    manifest = json.loads((extended["workdir"] / "manifest.json").read_text())
    expansion = manifest["generations"][1]["expansion"]
    vocabulary = expansion["metrics"]["vocabulary"]
    assert vocabulary["requested_new_tokens"] == 40 and vocabulary["report"]["new_tokens"] == 40
    assert vocabulary["report"]["old_unchanged_share"] == 1.0 and vocabulary["rows"] == 512 + 40
    assert set(expansion["metrics"]["bpb_drift"]) == {"en"}  # the new tokens entered the softmax: measured
    config = json.loads((extended["workdir"] / "g1" / "expanded" / "config.json").read_text())
    assert config["vocab_sizes"] == [512, 552] and config["base_config"]["vocab_size"] == 552


def test_new_rows_start_as_the_mean_of_the_tokens_they_replace(extended):
    sources = json.loads((extended["workdir"] / "g1" / "expanded" / "new_token_sources.json").read_text())
    from safetensors.torch import load_file as load

    base = load(str(extended["tiny"] / "model.safetensors"))["model.embed_tokens.weight"]
    rows = extended["expanded"]
    assert torch.equal(rows[:512], base)
    for token, ids in sources.items():
        assert torch.equal(rows[int(token)], base[ids].float().mean(0).to(base.dtype))


def test_stage1_trains_the_new_rows_only_and_stage2_none(extended):
    workdir, start = extended["workdir"], extended["expanded"]
    stage1, stage2 = _embedding(workdir / "g1" / "stage1"), _embedding(workdir / "g1" / "stage2")
    assert torch.equal(stage1[:512], start[:512]) and torch.equal(stage2[:512], start[:512])  # old rows: bit-identical
    assert not torch.equal(stage1[512:], start[512:])  # the new rows learned
    assert torch.equal(stage2[512:], stage1[512:])  # stage 2 trains routers and classifiers only
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert "lm.model.embed_tokens.weight[0:512]" in manifest["generations"][1]["stage1"]["frozen_checksums"]


def test_everything_downstream_reads_the_new_tokenizer(extended):
    workdir = extended["workdir"]
    manifest = json.loads((workdir / "manifest.json").read_text())
    stage1 = manifest["generations"][1]["prepare1"]
    meta = json.loads((workdir / stage1["data_dir"] / "meta.json").read_text())
    from layermoe.data import tokenizer_fingerprint

    extended_tokenizer = AutoTokenizer.from_pretrained(workdir / "g1" / "expanded")
    base_tokenizer = AutoTokenizer.from_pretrained(extended["tiny"])
    assert meta["tokenizer"] == tokenizer_fingerprint(extended_tokenizer) != tokenizer_fingerprint(base_tokenizer)
    result = layermoe(workdir, "eval", "--max-tokens", "200", "--json")
    figures = json.loads(result.stdout)
    assert set(figures["languages"]) >= {"en", "el"}
    result = layermoe(workdir, "generate", "--prompt", "Καλημέρα", "--max-new-tokens", "4")
    assert "Καλημέρα" in result.output


def test_lifelong_g2_extends_the_extended_tokenizer_again(extended, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(extended["workdir"], workdir, symlinks=True)
    layermoe(workdir, "extend", "--new", "hi", "--new-experts", "2", "--tokens", "400", "--new-tokens", "30",
             "--classifier-layers", "0")
    g1 = AutoTokenizer.from_pretrained(workdir / "g1" / "expanded")
    g2 = AutoTokenizer.from_pretrained(workdir / "g2" / "expanded")
    assert len(g2) == len(g1) + 30
    from layermoe.data import load_texts

    for lang in ("en", "el"):  # G0 and G1 texts keep their tokens
        texts = load_texts(lang, "builtin", split="all")[:300]
        assert [g1(t)["input_ids"] for t in texts] == [g2(t)["input_ids"] for t in texts]
    config = json.loads((workdir / "g2" / "expanded" / "config.json").read_text())
    assert config["vocab_sizes"] == [512, 552, 582]


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "0"], "--new-tokens must be at least 1, not 0"),
    (["--new-tokens", "70000"], "--new-tokens 70,000 is over the cap of 65,536: each new token is an embedding row to train, "
                                "and merges that rare cannot be trained"),
    (["--attach-marks"], "--attach-marks belongs to --new-tokens N"),
    (["--new-tokens", "60000"], None),  # more than ~950 sentences can give
])
def test_bad_vocabulary_settings_are_one_line_and_leave_the_work_dir(tmp_path, args, message):
    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2, shared_direction=2.0)
    workdir = tmp_path / "run"
    layermoe(workdir, "profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "300", "--neuron-top-n", "0")
    layermoe(workdir, "allocate", "--budget", "4")
    before = _tree(workdir)
    result = layermoe(workdir, "expand", *args, code=2)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and _tree(workdir) == before
    if message is not None:
        assert line == f"error: {message}"
    else:
        import re

        assert re.fullmatch(r"error: --new-tokens 60,000: the new languages' training text allows only [\d,]+ new tokens "
                            r"\(pairs seen at least twice that keep the old languages' tokens\): ask for at most [\d,]+, "
                            r"or give more text", line), line


def test_an_unsupported_tokenizer_is_one_line(tmp_path):
    """A WordPiece tokenizer (BERT-style) cannot be continued as BPE: refused before the expansion is written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2, shared_direction=2.0)
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, eos_token="<|endoftext|>", pad_token="<pad>").save_pretrained(tiny)
    workdir = tmp_path / "run"
    layermoe(workdir, "profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "300", "--neuron-top-n", "0")
    layermoe(workdir, "allocate", "--budget", "4")
    before = _tree(workdir)
    result = layermoe(workdir, "expand", "--new-tokens", "10", code=2)
    assert result.stderr.strip().startswith("error: --new-tokens: ") and "WordPiece" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and _tree(workdir) == before


def test_expand_again_with_another_vocabulary_invalidates_what_was_built_on_it(extended, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(extended["workdir"], workdir, symlinks=True)
    before = json.loads((workdir / "manifest.json").read_text())["generations"][1]
    assert before["stage1"]["status"] == before["stage2"]["status"] == "done"
    layermoe(workdir, "expand", "--new-tokens", "20", "--force")
    after = json.loads((workdir / "manifest.json").read_text())["generations"][1]
    assert after["expansion"]["metrics"]["vocabulary"]["rows"] == 512 + 20
    for step in ("prepare1", "stage1", "prepare2", "stage2"):
        assert after[step]["status"] == "pending", step
    assert len(AutoTokenizer.from_pretrained(workdir / "g1" / "expanded")) == 512 + 20
    layermoe(workdir, "train", "--stage", "1", *STAGE)  # re-prepared with the new tokenizer, not the old cache
    meta_dir = json.loads((workdir / "manifest.json").read_text())["generations"][1]["prepare1"]["data_dir"]
    assert meta_dir != before["prepare1"]["data_dir"]


def test_the_extended_tokenizer_is_saved_clean_of_the_machine_and_the_run(extended):
    """The extended tokenizer goes through the same clean save as the base one (issue 23, points 4-5)."""
    for name in ("expanded", "stage1", "stage2"):
        checkpoint = extended["workdir"] / "g1" / name
        config = json.loads((checkpoint / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "TokenizersBackend"
        assert not {"local_files_only", "is_local", "max_length", "stride", "truncation_strategy"} & set(config), name
        found = json.loads((checkpoint / "tokenizer.json").read_text())
        assert found["truncation"] is None and found["padding"] is None
        assert json.loads((checkpoint / "config.json").read_text())["base_config"]["_name_or_path"] == "tiny"
