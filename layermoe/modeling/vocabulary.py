"""New vocabulary rows in a model: the embedding (and an untied lm_head) grown for new tokens.

Each new token starts as the mean of the rows of the old tokens it replaces (its decomposition
into the base tokenizer's tokens), in the input embedding and, when untied, in the output one.
Old rows are not touched, so on old-language text (which never contains a new token, by
construction of the extended tokenizer) the model computes the same hidden states as before;
only the softmax gains the new tokens' logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def _inner(model: nn.Module) -> nn.Module:
    """The family model that owns the embeddings (our MoE wraps it as `.lm`)."""
    return getattr(model, "lm", model)


def source_mean_rows(weight: torch.Tensor, new_token_sources: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """[N, H]: for each new token id (in sorted order), the mean of the rows of its source token ids."""
    rows = []
    for token_id in sorted(new_token_sources):
        sources = torch.as_tensor(list(new_token_sources[token_id]), dtype=torch.long, device=weight.device)
        rows.append(weight.index_select(0, sources).float().mean(0))
    return torch.stack(rows).to(weight.dtype)


def add_token_rows(model: nn.Module, new_token_sources: Mapping[int, Sequence[int]]) -> int:
    """Grow `model`'s embeddings to hold every new token id and start each new row as the mean of its
    sources' rows (input and, if untied, output). Returns the new number of rows.

    Ids below the current row count (a matrix padded past the tokenizer, as Qwen's) reuse those rows.
    """
    inner = _inner(model)
    old_rows = inner.get_input_embeddings().weight.shape[0]
    needed = max(old_rows, max(new_token_sources) + 1)
    with torch.no_grad():
        embeddings = inner.get_input_embeddings().weight
        input_rows = source_mean_rows(embeddings, new_token_sources)  # read before the matrix is replaced
        output = inner.get_output_embeddings()
        tied = output is None or output.weight is embeddings
        output_rows = None if tied else source_mean_rows(output.weight, new_token_sources)
        if needed > old_rows:
            inner.resize_token_embeddings(needed, mean_resizing=False)
        ids = torch.tensor(sorted(new_token_sources), dtype=torch.long)
        embeddings = inner.get_input_embeddings().weight
        embeddings[ids.to(embeddings.device)] = input_rows.to(embeddings.device)
        if not tied:
            out = inner.get_output_embeddings().weight
            out[ids.to(out.device)] = output_rows.to(out.device)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "layermoe":  # the base config is the one a reload builds from
        config.base_config["vocab_size"] = needed
        config.vocab_size = needed
    return needed
