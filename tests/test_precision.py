"""Mixed precision in the MoE block: routing in fp32 whatever autocast says, experts in the
compute dtype (bf16 under bf16 autocast, also on the CPU so CI runs the path), and the
checkpoint field that no longer collides with transformers' `experts_implementation`."""

from __future__ import annotations

import json

import pytest
import torch
from test_modeling import dense_reference, make_block, run_block
from transformers import AutoModelForCausalLM

from layermoe.modeling import load_layermoe, modeling_layermoe, save_layermoe, upcycle
from layermoe.testing import make_tiny_model

# bf16 keeps 8 bits of mantissa: two bf16 GEMMs in a row agree with fp32 to about 1% of the
# output's scale. Stated once, used by every bf16 comparison here.
BF16_RELATIVE_TOLERANCE = 2e-2


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.fixture
def grouped_mm_dtypes(monkeypatch):
    """Record the dtypes every grouped GEMM of the block is called with."""
    seen = []
    real = modeling_layermoe._grouped_mm

    def spy(a, b, *args, **kwargs):
        seen.append((a.dtype, b.dtype))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(modeling_layermoe, "_grouped_mm", spy)
    return seen


def test_grouped_experts_run_in_bf16_under_autocast(grouped_mm_dtypes):
    block = make_block([2, 3], top_k=2, classes=3)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))  # fp32, as in training
    with torch.no_grad():
        reference = dense_reference(block, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grouped = run_block(block, x, "grouped")
            loop = run_block(block, x, "loop")
    assert grouped_mm_dtypes and set(grouped_mm_dtypes) == {(torch.bfloat16, torch.bfloat16)}
    assert grouped.dtype == torch.float32  # the residual stream keeps its dtype
    assert relative_error(grouped, reference) < BF16_RELATIVE_TOLERANCE
    assert relative_error(loop, reference) < BF16_RELATIVE_TOLERANCE
    assert relative_error(grouped, loop) < BF16_RELATIVE_TOLERANCE


def test_grouped_experts_stay_fp32_without_autocast(grouped_mm_dtypes):
    block = make_block([3], top_k=2)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = run_block(block, x, "grouped")
    assert set(grouped_mm_dtypes) == {(torch.float32, torch.float32)}
    assert (out - dense_reference(block, x)).abs().max().item() < 1e-5


def test_router_and_classifier_logits_are_fp32_under_autocast():
    block = make_block([2, 3], top_k=2, classes=3, hidden=64, inter=128)
    x = torch.randn(4, 33, 64, generator=torch.Generator().manual_seed(5))
    block.record_logits = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    router, classifier = block.last_router_logits, block.last_classifier_logits
    assert router.dtype == torch.float32 and classifier.dtype == torch.float32
    flat = x.reshape(-1, 64)
    # Exactly the fp32 computation, so the top-k set is the fp32 one for every token.
    assert torch.equal(router, flat @ block.router.weight.T)
    assert torch.equal(classifier, flat @ block.classifier.weight.T)


def test_bf16_autocast_gradients_reach_the_fp32_expert_weights():
    block = make_block([3], top_k=2)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_block(block, x, "grouped").sum().backward()
    grad = block.experts["g1"].gate_up_proj.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert block.router.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# The kernel choice in the checkpoint: `moe_kernel`, not transformers' `experts_implementation`
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    base = AutoModelForCausalLM.from_pretrained(make_tiny_model(root / "tiny", "llama", num_layers=2))
    return save_layermoe(upcycle(base, [2, 1]), root / "expanded")


def kernels_of(model) -> set[str]:
    return {block.moe_kernel for block in model.moe_blocks().values()}


def test_checkpoint_stores_moe_kernel(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["moe_kernel"] == "auto"
    assert "experts_implementation" not in config


@pytest.mark.parametrize("option,kernel", [("eager", "loop"), ("grouped_mm", "grouped")])
def test_transformers_experts_implementation_option_picks_our_kernel(checkpoint, option, kernel):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, experts_implementation=option)
    assert model.config.moe_kernel == kernel and kernels_of(model) == {kernel}


def test_checkpoint_written_with_the_old_field_name_still_loads(checkpoint, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    config = json.loads((old / "config.json").read_text())
    config["experts_implementation"] = config.pop("moe_kernel") and "loop"
    (old / "config.json").write_text(json.dumps(config))
    model = load_layermoe(old)
    assert model.config.moe_kernel == "loop" and kernels_of(model) == {"loop"}
    ids = torch.randint(2, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_layermoe(checkpoint)(ids).logits)
