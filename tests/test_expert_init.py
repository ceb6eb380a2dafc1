"""`extend --expert-init routed` on a constructed router: the routing mass finds the expert the new
languages use, and add_generation starts the new experts (and their router rows) as its copies."""

from __future__ import annotations

import pytest
import torch

from layermoe.core.errors import LayermoeError
from layermoe.modeling import add_generation, upcycle
from layermoe.profiling.expert_use import RoutingMass, most_routed_experts
from layermoe.testing import make_tiny_model


@pytest.fixture
def moe(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, "llama", num_layers=2), dtype=torch.float32)
    model = upcycle(dense, [3, 2]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct G1 experts, so a copy of one is told apart from a copy of another
        for block in model.moe_blocks().values():
            for p in block.experts["g1"].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def test_routed_init_copies_the_expert_the_new_languages_use(moe):
    hidden = moe.config.hidden_size
    u = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(2)), dim=0)
    new_tokens = (u + 0.01 * torch.randn(2, 5, hidden)).float()  # [B, T, H] "new language": along +u
    old_tokens = (-u + 0.01 * torch.randn(2, 5, hidden)).float()  # "old language": along -u
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding is not counted
    blocks = moe.moe_blocks()
    with torch.no_grad():  # constructed routers: +u goes to expert 2 (layer 0) / 1 (layer 1), -u to the last expert
        for block, (toward_new, toward_old) in zip(blocks.values(), ((2, 3), (1, 2))):
            block.router.weight.zero_()
            block.router.weight[toward_new] = 20 * u
            block.router.weight[toward_old] = -20 * u
    mass = RoutingMass([blocks[0].num_experts, blocks[1].num_experts])
    for layer, block in blocks.items():
        mass.add_routed("bn", layer, block, new_tokens, mask)
        mass.add_routed("en", layer, block, old_tokens, mask)
    record = mass.as_lists()
    for layer in (0, 1):
        assert sum(record["bn"][layer]) == pytest.approx(8)  # 8 counted tokens, weight 1 each
    assert most_routed_experts(record, ["bn"]) == [2, 1]
    assert most_routed_experts(record, ["en"]) == [3, 2]
    assert most_routed_experts({"x": [[1.0, 1.0, 0.5]]}, ["x"]) == [0]  # a tie goes to the lower index

    learned = {i: (b.router.weight.clone(), b.experts["g1"].gate_up_proj.clone(), b.experts["g1"].down_proj.clone())
               for i, b in blocks.items()}
    add_generation(moe, [2, 1], expert_sources=[2, 1], router_init="source")
    for layer, source in ((0, 2), (1, 1)):
        block = moe.moe_blocks()[layer]
        router, gate_up, down = learned[layer]
        g2 = block.experts["g2"]
        for e in range(g2.num_experts):  # G1's expert `source` is g1 local index source - 1
            assert torch.equal(g2.gate_up_proj[e], gate_up[source - 1])
            assert torch.equal(g2.down_proj[e], down[source - 1])
        old_rows = router.shape[0]
        assert torch.equal(block.router.weight[:old_rows], router)  # learned rows kept
        assert all(torch.equal(row, router[source]) for row in block.router.weight[old_rows:])
    with pytest.raises(LayermoeError, match="^layer 1 has experts 0..3; it cannot copy expert 4$"):
        add_generation(moe, [0, 1], expert_sources=[0, 4])


def test_expert0_source_is_the_default(moe):
    expert0 = moe.moe_blocks()[0].expert0
    add_generation(moe, [1, 0])
    g2 = moe.moe_blocks()[0].experts["g2"]
    assert torch.equal(g2.gate_up_proj[0], torch.cat([expert0.gate_proj.weight, expert0.up_proj.weight]))
    assert torch.equal(g2.down_proj[0], expert0.down_proj.weight)
