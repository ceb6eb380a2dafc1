"""Every place layermoe relies on a private or recently changed API of torch, transformers,
accelerate or gguf, in one module. Each shim says which versions it covers; tests/test_compat.py
checks each one on the versions installed (CI runs it on the locked, the newest and the lowest
versions pyproject.toml allows).

Copied into every saved checkpoint beside the model files (it imports only torch and
transformers at the top; accelerate and gguf are imported inside `try` blocks, so a checkpoint
loads with `trust_remote_code=True` where only torch and transformers are installed).
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

# ----------------------------------------------------------------------------------------
# transformers: the KV cache's name in model outputs and forward keywords
# ----------------------------------------------------------------------------------------
# transformers <= 5.23: `past_key_values`; 5.24 and later: `cache` (ModelOutput rewrites the old
# keyword for its own subclasses, and the families' forward take `cache`, warning on the old name).
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
CACHE_KEYWORDS = ("cache", "past_key_values")

# The CausalLM output our model extends: subclassing it keeps the cache field's name whatever it is.
CausalLMOutputBase = CausalLMOutputWithPast


def output_cache(output):
    """The KV cache of a model output (None when the forward kept none). transformers 5.0-5.25+."""
    return output.get(CACHE_FIELD) if hasattr(output, "get") else getattr(output, CACHE_FIELD, None)


def pop_cache_argument(kwargs: dict, past_key_values=None):
    """The cache a caller passed to our forward, by either name (generate uses `cache` from 5.24 on)."""
    cache = past_key_values
    for name in CACHE_KEYWORDS:
        value = kwargs.pop(name, None)
        if value is not None:
            cache = value
    return cache


_cache_keyword_memo: dict[type, str] = {}


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword `module.forward` takes its KV cache by: `cache` (5.24+) or `past_key_values` (earlier)."""
    kind = type(module)
    if kind not in _cache_keyword_memo:
        params = inspect.signature(kind.forward).parameters
        _cache_keyword_memo[kind] = "cache" if "cache" in params else "past_key_values"
    return _cache_keyword_memo[kind]


# ----------------------------------------------------------------------------------------
# transformers: loading
# ----------------------------------------------------------------------------------------
def model_loading_options() -> dict:
    """Keyword arguments for every `from_pretrained` of a model: no kernels from the hub.

    transformers 5.25 turned `use_kernels` on by default: loading then needs the `kernels` package
    and fetches kernels from the hub, which an offline tool must never need. 5.0-5.24 take the same
    keyword with False as their default, so passing it changes nothing there.
    """
    return {"use_kernels": False}


# ----------------------------------------------------------------------------------------
# transformers: loading options read off a config
# ----------------------------------------------------------------------------------------
def requested_attn_implementation(config) -> str | None:
    """What `from_pretrained(attn_implementation=...)` asked for (the private `_attn_implementation`, 5.0+)."""
    return getattr(config, "_attn_implementation", None)


def take_experts_implementation(config, ours: dict) -> str | None:
    """Our MoE kernel for transformers' own `experts_implementation` loading option, if one was given.

    transformers 5.x keeps it in the private `config._experts_implementation` and refuses values it does
    not know in PreTrainedModel.__init__, so the value is taken (cleared) before that runs.
    """
    requested = getattr(config, "_experts_implementation", None)
    if requested in ours:
        config._experts_implementation = None
        return ours[requested]
    return None


# ----------------------------------------------------------------------------------------
# torch: grouped GEMM
# ----------------------------------------------------------------------------------------
# torch.nn.functional.grouped_mm is public from torch 2.10 on; 2.8-2.9 had only torch._grouped_mm.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ----------------------------------------------------------------------------------------
# accelerate: the process-wide state between two stages in one process
# ----------------------------------------------------------------------------------------
def reset_accelerate_state() -> None:
    """Forget accelerate's AcceleratorState and GradientState, keeping the process group (PartialState).

    accelerate (1.0-1.16) keeps one AcceleratorState per process and refuses another precision or
    accumulation in it; a recipe or `compare` trains several stages in one process. `_reset_state`
    is private; transformers' Trainer calls it the same way between hyperparameter-search trials.
    """
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:
        return
    AcceleratorState._reset_state()
    GradientState._reset_state()


def mark_fsdp_on_cpu(accelerator, plugin) -> None:
    """Make accelerate's shared states say FSDP for a CPU run (accelerate 1.x runs CPU processes as DDP only).

    Writes the private `PartialState._shared_state`: a later AcceleratorState() copies PartialState's
    distributed type back over its own, as it does for FSDP on GPUs.
    """
    try:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType
    except ImportError:
        return
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


# ----------------------------------------------------------------------------------------
# transformers + gguf: GGUF loading
# ----------------------------------------------------------------------------------------
def silence_gguf_progress() -> None:
    """transformers' GGUF loader uses tqdm directly (module attribute `tqdm`, 5.0+), not its progress switch."""
    try:
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    if hasattr(gguf_utils, "tqdm") and not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


@contextmanager
def shared_gguf_parsing():
    """Parse a GGUF once instead of once per transformers call (config, tokenizer, weights).

    transformers (5.0+) builds a fresh `gguf.GGUFReader` (seconds: it walks the vocabulary in Python)
    and a fresh `gguf.get_tensor_name_map` per layer for each call; both are read-only, so the module
    attributes are swapped for memoised versions while the block runs.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    from functools import lru_cache

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


__all__ = [
    "CACHE_FIELD",
    "CACHE_KEYWORDS",
    "CausalLMOutputBase",
    "cache_keyword",
    "grouped_mm",
    "mark_fsdp_on_cpu",
    "model_loading_options",
    "output_cache",
    "pop_cache_argument",
    "requested_attn_implementation",
    "reset_accelerate_state",
    "shared_gguf_parsing",
    "silence_gguf_progress",
    "take_experts_implementation",
]
