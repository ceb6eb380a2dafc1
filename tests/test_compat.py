"""Each shim of `layermoe.compat` against the library versions installed here.

CI runs this file on the locked set, on the newest versions pyproject.toml allows and on the
lowest ones, so every branch a shim has is taken by one of those runs. Each test names the
versions whose behaviour it pins down.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from layermoe import compat
from layermoe.modeling import LayermoeCausalLMOutput, upcycle
from layermoe.testing import make_tiny_model

TRANSFORMERS = Version(transformers.__version__).release
TORCH = Version(torch.__version__).release


def test_cache_field_is_the_one_transformers_uses():
    """transformers <= 5.23: `past_key_values`; 5.24 and later: `cache`."""
    expected = "cache" if TRANSFORMERS >= (5, 24) else "past_key_values"
    assert compat.CACHE_FIELD == expected
    assert expected in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    # our output extends the family's, so it has the same field, built and read by that name
    ours = LayermoeCausalLMOutput(**{expected: "kv"}, router_logits={0: 1})
    assert compat.output_cache(ours) == "kv" and ours.router_logits == {0: 1}
    assert compat.output_cache(LayermoeCausalLMOutput()) is None


def test_pop_cache_argument_takes_either_name():
    """generate passes `cache=` from transformers 5.24 on and `past_key_values=` before."""
    for name in compat.CACHE_KEYWORDS:
        kwargs = {name: "kv", "other": 1}
        assert compat.pop_cache_argument(kwargs) == "kv" and kwargs == {"other": 1}
    assert compat.pop_cache_argument({}, past_key_values="given") == "given"


def test_cache_keyword_of_the_family_forward(tmp_path):
    """The families' forward take `cache` from transformers 5.24 on, `past_key_values` before."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"), **compat.model_loading_options())
    assert compat.cache_keyword(model) == ("cache" if TRANSFORMERS >= (5, 24) else "past_key_values")


def test_expanded_model_decodes_with_the_cache_under_either_keyword(tmp_path):
    """Cached decoding through our forward equals the full forward, whatever the keyword (all 5.x)."""
    base = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"), **compat.model_loading_options())
    model = upcycle(base.eval(), [2, 2]).eval()
    ids = torch.randint(2, 400, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        for keyword in compat.CACHE_KEYWORDS:
            out = model(ids[:, :5], use_cache=True)
            step = model(ids[:, 5:], use_cache=True, **{keyword: compat.output_cache(out)})
            assert torch.allclose(torch.cat([out.logits, step.logits], 1), full, atol=1e-5), keyword


def test_model_loading_options_load_without_hub_kernels(tmp_path):
    """transformers 5.25 turned `use_kernels` on by default (it needs the `kernels` package and the hub);
    5.0-5.24 take `use_kernels=False` as a no-op. Our loader loads on every one of them."""
    path = make_tiny_model(tmp_path / "m")
    assert compat.model_loading_options() == {"use_kernels": False}
    model = AutoModelForCausalLM.from_pretrained(path, **compat.model_loading_options())
    assert model.config.model_type == "llama"
    kernels_missing = importlib.util.find_spec("kernels") is None
    if TRANSFORMERS >= (5, 25) and kernels_missing:
        import os

        if os.environ.get("USE_HUB_KERNELS", "YES").upper() not in ("0", "NO", "FALSE", "OFF"):
            with pytest.raises(ValueError, match="Kernels are not available"):
                AutoModelForCausalLM.from_pretrained(path)  # what the option avoids


def test_experts_implementation_is_taken_before_transformers_sees_it():
    """transformers 5.x keeps `experts_implementation` in the private `config._experts_implementation`."""

    class Config:
        _experts_implementation = "eager"

    config = Config()
    assert compat.take_experts_implementation(config, {"eager": "loop"}) == "loop"
    assert config._experts_implementation is None
    assert compat.take_experts_implementation(config, {"eager": "loop"}) is None


def test_requested_attn_implementation_reads_the_private_field(tmp_path):
    """`attn_implementation=` of from_pretrained lands in `config._attn_implementation` (transformers 5.x)."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"), attn_implementation="eager",
                                                 **compat.model_loading_options())
    assert compat.requested_attn_implementation(model.config) == "eager"


def test_grouped_mm_is_found_and_exact():
    """torch.nn.functional.grouped_mm from torch 2.10 on (torch._grouped_mm in 2.8-2.9); it runs on the CPU from 2.10."""
    assert compat.grouped_mm is not None
    if TORCH >= (2, 10):
        assert compat.grouped_mm is torch.nn.functional.grouped_mm
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(2, 16, 8, generator=gen, dtype=torch.bfloat16)
    offs = torch.tensor([2, 5], dtype=torch.int32)
    got = compat.grouped_mm(x, w, offs=offs)
    want = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    assert torch.allclose(got.float(), want.float(), atol=1e-2)


def test_reset_accelerate_state_allows_a_second_precision():
    """accelerate 1.x refuses a second AcceleratorState of another precision in one process unless reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    compat.reset_accelerate_state()
    Accelerator(mixed_precision="no", cpu=True)
    compat.reset_accelerate_state()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    assert accelerator.mixed_precision == "bf16"
    assert PartialState._shared_state  # the process group's state is kept
    compat.reset_accelerate_state()
    assert not AcceleratorState._shared_state


def test_silence_gguf_progress_disables_the_converters_bar():
    """transformers' GGUF loader (5.x) calls the module attribute `tqdm` directly."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    compat.silence_gguf_progress()
    compat.silence_gguf_progress()  # idempotent: one partial, not a partial of a partial
    assert isinstance(gguf_utils.tqdm, functools.partial) and gguf_utils.tqdm.keywords == {"disable": True}
    assert not isinstance(gguf_utils.tqdm.func, functools.partial)


def test_shared_gguf_parsing_reads_a_file_once_and_restores(tmp_path):
    """gguf (0.10+): GGUFReader and get_tensor_name_map are module attributes transformers looks up per call."""
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with compat.shared_gguf_parsing():
        assert gguf.GGUFReader(str(path)) is gguf.GGUFReader(str(path))
    assert gguf.GGUFReader is original
