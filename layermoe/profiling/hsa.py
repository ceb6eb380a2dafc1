"""Capture each layer's HSA (hidden state after attention) with forward pre-hooks.

The HSA of layer i is the input of `layers[i].mlp`: the output of the post-attention norm
(Llama, Qwen2, Qwen3, Mistral, Gemma) or of the pre-feedforward norm (Gemma2). It is exactly
the tensor a router placed in front of the FFN sees, so hooking the input of `mlp` is right
for the dense base model and for an expanded model whose `mlp` is a MoE block alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from layermoe.core.errors import LayermoeError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers: `model.model.layers`, or one wrapper deeper.

    Handles a bare base model (`model.layers`), a causal LM (`model.model.layers`) and a wrapper
    whose causal LM sits at `model.model` (`model.model.model.layers`).
    """
    for path in ("model.layers", "model.model.layers", "lm.model.layers", "layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0 and all(hasattr(layer, "mlp") for layer in obj):
            return obj
    raise LayermoeError(
        f"cannot find the decoder layers of {type(model).__name__}: expected `model.layers` with an `mlp` per layer "
        "(supported families: Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma2)"
    )


@contextmanager
def capture_ffn_inputs(
    model: nn.Module, on_input: Callable[[int, torch.Tensor], None]
) -> Iterator[nn.ModuleList]:
    """While active, call `on_input(layer_index, hsa)` with hsa [batch, seq, hidden] on every forward.

    The hooks are removed on exit, even after an exception.
    """
    layers = decoder_layers(model)
    handles = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            # The FFN is called as mlp(hidden_states); accept the keyword form too.
            hsa = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            on_input(index, hsa)

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.mlp.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        yield layers
    finally:
        for handle in handles:
            handle.remove()


def tokenizer_prepends_bos(tokenizer) -> bool:
    """True when `tokenizer(text)` starts every encoding with its BOS token (Llama, Gemma; not Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = "Hello"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and with_special[1 : 1 + len(plain)] == plain


def token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None, include_bos: bool = False
) -> torch.Tensor:
    """Which positions count as profiled tokens: bool [batch, seq].

    Padding (attention_mask == 0) never counts. With include_bos=False, position 0 of a sequence
    is dropped when it holds `bos_token_id`; pass bos_token_id=None when the tokenizer does not
    prepend BOS (see `tokenizer_prepends_bos`), so a real token that happens to share the id is
    kept. Sequences are right-padded, so position 0 is always the first real token.
    """
    mask = attention_mask.bool().clone()  # [B, T]
    if not include_bos and bos_token_id is not None:
        mask[:, 0] &= input_ids[:, 0] != bos_token_id
    return mask
