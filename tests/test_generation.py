"""Generation with the KV cache equals generation without it (the expanded model's routing included)."""

from __future__ import annotations

import pytest
import torch

from layermoe.modeling.generation import continue_text
from layermoe.testing import make_tiny_model


@pytest.mark.parametrize("classes", [2, 3])  # the paper's binary classifier, and one class per generation
def test_greedy_generation_with_cache_equals_without(tmp_path, classes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layermoe import modeling

    path = make_tiny_model(tmp_path / "tiny", "llama", num_layers=3, seed=5)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    model = modeling.upcycle(base, [2, 1, 3], classifier_layers=[0, 2], seed=1)
    if classes == 3:
        modeling.add_generation(model, [1, 2, 1], classifier_layers=[1], classifier_classes=3, seed=2)
    with torch.no_grad():  # spread the router and classifier logits so their decisions vary from token to token
        for block in model.moe_blocks().values():
            block.router.weight.mul_(50)
            if block.classifier is not None:
                block.classifier.weight.mul_(50)
    streamed = []
    cached = continue_text(model, tok, "Καλημέρα σας", max_new_tokens=20, use_cache=True, stop_at_eos=False,
                           on_text=streamed.append)
    uncached = continue_text(model, tok, "Καλημέρα σας", max_new_tokens=20, use_cache=False, stop_at_eos=False)
    assert len(cached.new_ids) == 20
    assert cached.new_ids == uncached.new_ids
    assert "".join(streamed) == cached.text
    sampled = [continue_text(model, tok, "Καλημέρα", max_new_tokens=8, temperature=1.0, seed=s).new_ids for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]  # the seed decides the sample
