"""The expanded model: function preservation, expert kernels vs a dense reference, classifier
routing, checkpoints (same process and fresh process), parameter groups, lifelong expansion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from layermoe.compat import CACHE_FIELD, output_cache
from layermoe.core.errors import LayermoeError
from layermoe.modeling import (
    LayermoeForCausalLM,
    LayermoeMoeBlock,
    add_generation,
    load_layermoe,
    modeling_layermoe,
    parameter_groups,
    register_auto_classes,
    save_layermoe,
    upcycle,
)
from layermoe.testing import TINY_FAMILIES, make_tiny_model

NEW_EXPERTS = [2, 0, 3]  # layer 1 stays dense


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_model(root / fam, fam, num_layers=3) for fam in TINY_FAMILIES}


def load_base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturb_experts(model, scale=0.05, seed=1):
    """Make new experts and routers differ from their init (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name or ".mlp.router." in name or ".mlp.classifier." in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------
# Function preservation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_upcycle_preserves_logits_and_greedy_generation(tiny_dirs, family):
    base = load_base(tiny_dirs[family])
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    model = upcycle(base, NEW_EXPERTS, classifier_layers=[2])
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
    # Layer 1 got no expert: the family's own MLP module, untouched.
    assert type(model.lm.model.layers[1].mlp) is type(base.model.layers[1].mlp)
    assert "lm.model.layers.0.mlp.expert0.gate_proj.weight" in model.state_dict()
    prompt = ids[:1, :5]
    want = base.generate(prompt, max_new_tokens=6, do_sample=False)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_upcycle_bad_inputs_raise_one_line_errors(tiny_dirs):
    base = load_base(tiny_dirs["llama"])
    with pytest.raises(LayermoeError, match=r"^got 2 new-expert counts for a model with 3 layers; give one count per layer$"):
        upcycle(base, [1, 1])
    with pytest.raises(LayermoeError, match=r"^classifier layers \[1\] are not MoE layers"):
        upcycle(base, NEW_EXPERTS, classifier_layers=[1])
    model = upcycle(base, NEW_EXPERTS)
    with pytest.raises(LayermoeError, match=r"^router_init='bogus'; use one of expert0, source, mean, zeros, normal, reinit$"):
        add_generation(model, [1, 1, 1], router_init="bogus")


# ---------------------------------------------------------------------------------------
# Expert kernels: grouped == loop == dense reference
# ---------------------------------------------------------------------------------------
def make_block(new_experts, top_k, classes=0, seed=0, hidden=32, inter=64):
    from transformers.models.llama.modeling_llama import LlamaMLP

    from layermoe.testing import make_tiny_config

    torch.manual_seed(seed)
    cfg = make_tiny_config("llama", hidden_size=hidden, intermediate_size=inter, num_attention_heads=1, num_key_value_heads=1)
    mlp = LlamaMLP(cfg)
    block = LayermoeMoeBlock(mlp, new_experts, top_k=top_k, classifier_classes=classes)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def dense_reference(block: LayermoeMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with an independently computed [T, E] weight matrix."""
    t = x.reshape(-1, x.shape[-1]).float()
    m = block.expert0
    outs = [F.linear(F.silu(F.linear(t, m.gate_proj.weight)) * F.linear(t, m.up_proj.weight), m.down_proj.weight)]
    gens = [0]
    for g, n in enumerate(block.new_experts, start=1):
        if n == 0:
            continue
        grp = block.experts[f"g{g}"]
        for e in range(n):
            gate, up = F.linear(t, grp.gate_up_proj[e]).chunk(2, -1)
            outs.append(F.linear(F.silu(gate) * up, grp.down_proj[e]))
            gens.append(g)
    outs = torch.stack(outs, 1)  # [T, E, H]
    gens = torch.tensor(gens)
    logits = F.linear(t, block.router.weight)  # [T, E]
    classes = None
    if block.classifier is not None:
        classes = F.linear(t, block.classifier.weight).argmax(-1)
    weights = torch.zeros_like(logits)
    for i in range(t.shape[0]):
        allowed = torch.ones(len(gens), dtype=torch.bool)
        if classes is not None:
            c = int(classes[i])
            if c == 0:
                weights[i, 0] = 1.0
                continue
            if block.classifier.out_features > 2:
                allowed = gens <= c
        p = logits[i].masked_fill(~allowed, float("-inf")).softmax(-1)
        k = min(block.top_k, int(allowed.sum()))
        top = p.topk(k)
        weights[i, top.indices] = top.values / top.values.sum()
    return (weights.unsqueeze(-1) * outs).sum(1).reshape(x.shape)


def run_block(block, x, impl):
    block.moe_kernel = impl
    return block(x)


@pytest.mark.parametrize(
    "new_experts,top_k,classes",
    [([2, 0, 3], 2, 0), ([1], 2, 0), ([1], 3, 0), ([2, 3], 2, 3), ([1, 3], 3, 3), ([2, 3], 3, 2)],
    ids=["gap-generation", "E2k2", "E2k3-clipped", "3-class", "3-class-k-clipped", "binary-classifier-k3"],
)
def test_grouped_loop_and_dense_reference_agree(new_experts, top_k, classes):
    block = make_block(new_experts, top_k, classes)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 3.0  # a constant feature lets us steer router and classifier
    with torch.no_grad():
        if sum(new_experts) >= 3:  # make the last expert lose for every token: it receives nothing
            block.router.weight[-1].zero_()
            block.router.weight[-1, 0] = -50.0
    ref = dense_reference(block, x)
    loop = run_block(block, x, "loop")
    grouped = run_block(block, x, "grouped")
    assert (loop - ref).abs().max().item() < 1e-5
    assert (grouped - ref).abs().max().item() < 1e-5


def test_grouped_falls_back_to_loop_on_unaligned_shapes():
    # fp32 rows of 34 values are not 16-byte aligned: grouped_mm cannot take them.
    block = make_block([2], top_k=2, hidden=34, inter=60)
    x = torch.randn(2, 5, 34, generator=torch.Generator().manual_seed(8))
    assert not modeling_layermoe.grouped_mm_usable(x, block.experts["g1"])
    assert (run_block(block, x, "grouped") - dense_reference(block, x)).abs().max().item() < 1e-5


def test_grouped_and_loop_gradients_agree():
    block = make_block([2, 3], top_k=2)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    grads = {}
    for impl in ("loop", "grouped"):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        (run_block(block, xi, impl) * g).sum().backward()
        grads[impl] = [xi.grad] + [p.grad.clone() for p in block.parameters()]
    for a, b in zip(grads["loop"], grads["grouped"]):
        assert (a - b).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------
# Routing classifier
# ---------------------------------------------------------------------------------------
def test_old_classified_tokens_use_expert0_alone(monkeypatch):
    block = make_block([2, 1], top_k=2, classes=2)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    x[..., 0] = 3.0
    x[0, :, 1] = 5.0  # sequence 0: "old"
    x[1, :, 1] = -5.0  # sequence 1: "new"
    with torch.no_grad():
        block.classifier.weight.zero_()
        block.classifier.weight[0, 1] = 1.0  # class 0 wins where feature 1 > 0
        block.classifier.weight[1, 1] = -1.0
    routed_rows = []
    real_route = modeling_layermoe.route_top_k
    monkeypatch.setattr(
        modeling_layermoe, "route_top_k", lambda logits, *a: routed_rows.append(logits.shape[0]) or real_route(logits, *a)
    )
    expert0_only = block.expert0(x)
    out = block(x)
    assert routed_rows == [6]  # only the 6 "new" tokens reach the router's top-k
    assert torch.equal(out[0], expert0_only[0])
    assert not torch.allclose(out[1], expert0_only[1], atol=1e-3)
    # All tokens old: new experts receive nothing, so NaN weights there cannot leak.
    with torch.no_grad():
        block.classifier.weight[1, 1] = 1.0
        block.classifier.weight[1, 0] = -1.0
        for grp in block.experts.values():
            grp.gate_up_proj.fill_(float("nan"))
    out = block(x)
    assert torch.equal(out, expert0_only)


def test_causal_segment_mean_against_a_loop():
    """Sequence pooling (issue 10, item 12): the running mean of the non-padding tokens so far, restarted
    at each document start, continued from a carried (sum, count) across KV-cache calls."""
    from layermoe.modeling.modeling_layermoe import causal_segment_mean

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 5, generator=gen)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, :2] = False  # left padding
    keep[2, 5:] = False  # right padding
    starts = torch.zeros(3, 7, dtype=torch.bool)
    starts[0, 3] = starts[2, 2] = True  # a new document after an EOS
    carry_sum, carry_count = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    got, (new_sum, new_count) = causal_segment_mean(x, keep, starts, (carry_sum, carry_count))
    for b in range(3):
        total, count = carry_sum[b].clone(), float(carry_count[b])
        for t in range(7):
            if starts[b, t]:
                total, count = torch.zeros(5, dtype=torch.float64), 0.0
            if keep[b, t]:
                total, count = total + x[b, t].double(), count + 1
            want = total / max(count, 1.0)
            assert torch.allclose(got[b, t].double(), want, atol=1e-6), (b, t)
        assert torch.allclose(new_sum[b], total) and float(new_count[b]) == count


def _sequence_model(tiny_dirs, seed=0):
    base = load_base(tiny_dirs["llama"])
    model = upcycle(base, NEW_EXPERTS, classifier_layers=[0, 2], classifier_granularity="sequence").eval()
    perturb_experts(model, scale=0.5, seed=seed)  # classifier decisions that depend on what is pooled
    return model


def test_sequence_classifier_is_causal_prefix_invariant(tiny_dirs):
    """A position's logits do not depend on later tokens: a shared prefix gives the same logits whatever follows."""
    model = _sequence_model(tiny_dirs)
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for trial in range(10):
        prefix = torch.randint(2, 500, (1, 12), generator=gen)
        a = torch.cat([prefix, torch.randint(2, 500, (1, 8), generator=gen)], 1)
        b = torch.cat([prefix, torch.randint(2, 500, (1, 8), generator=gen)], 1)
        with torch.no_grad():
            la, lb = model(a).logits[:, :12], model(b).logits[:, :12]
        worst = max(worst, (la - lb).abs().max().item())
    assert worst <= 1e-5


def test_sequence_classifier_cached_decoding_equals_the_full_forward(tiny_dirs):
    """Token-by-token decoding with a KV cache (left padding, an EOS inside) gives the full forward's logits."""
    model = _sequence_model(tiny_dirs, seed=2)
    eos = model.config.eos_token_id
    ids = torch.randint(2, 500, (2, 16), generator=torch.Generator().manual_seed(9))
    ids[0, 6] = eos  # a document boundary inside row 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1, as batched generation has
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(5, 16):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **{CACHE_FIELD: cache}, use_cache=True)
            steps.append(out.logits)
            cache = output_cache(out)
    cached = torch.cat(steps, 1)
    keep = mask.bool()
    assert (cached - full)[keep].abs().max().item() <= 1e-4
    # ... and greedy generation with and without the cache agrees
    prompt = ids[:1, :6]
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                           model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))


def test_packed_documents_pool_separately(tiny_dirs):
    """In a packed training block the pool restarts after each EOS: the second document's classifier
    input is its own running mean, whatever came before it in the block."""
    model = _sequence_model(tiny_dirs)
    eos = model.config.eos_token_id
    gen = torch.Generator().manual_seed(4)
    second = torch.randint(2, 500, (1, 6), generator=gen)
    blocks = [torch.cat([torch.randint(2, 500, (1, n), generator=gen), torch.tensor([[eos]]), second], 1) for n in (3, 9)]
    seen = []
    hook = model.moe_blocks()[2].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        outs = [model(b, output_router_logits=True).classifier_logits[2] for b in blocks]
    hook.remove()
    for out, x, block in zip(outs, seen, blocks):
        start = block.shape[1] - 6
        running = x[0, start:].cumsum(0) / torch.arange(1, 7).unsqueeze(1)
        want = F.linear(running.float(), model.moe_blocks()[2].classifier.weight.float())
        assert (out[start:] - want).abs().max().item() < 1e-5


def test_forward_passes_use_cache_and_logits_to_keep_through(tiny_dirs):
    """Profiling an expanded model asks for no KV cache and the logits of one position (issue 10, item 13)."""
    from layermoe.profiling.similarity import _forward_kwargs

    model = upcycle(load_base(tiny_dirs["llama"]), NEW_EXPERTS).eval()
    assert _forward_kwargs(model) == {"use_cache": False, "logits_to_keep": 1}
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, **_forward_kwargs(model))
        full = model(ids)
    assert out.logits.shape == (2, 1, full.logits.shape[-1]) and output_cache(out) is None
    assert torch.allclose(out.logits[:, 0], full.logits[:, -1], atol=1e-6)


def test_router_init_expert0_docstring_does_not_promise_undisturbed_routing(tiny_dirs):
    """With tied copies, expert-0 router rows do move earlier tokens (README: measured drift); the docstring says so."""
    model = upcycle(load_base(tiny_dirs["llama"]), NEW_EXPERTS).eval()
    perturb_experts(model)
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        add_generation(model, [1, 1, 1], router_init="expert0")
        after = model(ids).logits
    assert (after - before).abs().max().item() > 1e-6  # earlier tokens' outputs did move
    doc = " ".join(add_generation.__doc__.split())
    assert "are undisturbed" not in doc and "keeps expert 0's output" not in doc
    assert "its output can move" in doc


# ---------------------------------------------------------------------------------------
# Logits on request
# ---------------------------------------------------------------------------------------
def test_router_and_classifier_logits_per_layer(tiny_dirs):
    base = load_base(tiny_dirs["qwen3"])
    model = upcycle(base, NEW_EXPERTS, classifier_layers=[2])
    ids = torch.randint(2, 500, (2, 5), generator=torch.Generator().manual_seed(6))
    seen = {}
    for i, block in model.moe_blocks().items():
        block.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, inp[0].detach()))
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), output_router_logits=True)
        plain = model(ids)
    assert plain.router_logits is None and plain.classifier_logits is None
    assert sorted(out.router_logits) == [0, 2] and sorted(out.classifier_logits) == [2]
    assert out.router_logits[0].shape == (10, 3) and out.router_logits[2].shape == (10, 4)
    assert out.classifier_logits[2].shape == (10, 2)
    for i, logits in out.router_logits.items():
        assert logits.dtype == torch.float32
        want = F.linear(seen[i].reshape(-1, seen[i].shape[-1]).float(), model.moe_blocks()[i].router.weight.float())
        assert torch.equal(logits, want)
    assert model.expert_generation_ids(2) == [0, 1, 1, 1]


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
def test_save_and_reload_same_process_and_fresh_process(tmp_path):
    src = make_tiny_model(tmp_path / "base", "qwen2", num_layers=3, tie_word_embeddings=True)
    model = upcycle(load_base(src), NEW_EXPERTS, classifier_layers=[2])
    add_generation(model, [1, 2, 0], classifier_layers=[0, 2])
    perturb_experts(model)
    ids = torch.randint(2, 500, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids).logits
    out_dir = save_layermoe(model, tmp_path / "moe")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == "layermoe" and cfg["base_config"]["model_type"] == "qwen2"
    assert cfg["new_experts"] == [[2, 1], [0, 2], [3, 0]] and cfg["classifier_classes"] == 3
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_layermoe.LayermoeForCausalLM"
    assert "top_k" not in cfg  # would be read as a sampling parameter

    reloaded = load_layermoe(out_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)
    assert reloaded.lm.lm_head.weight is reloaded.lm.model.embed_tokens.weight

    register_auto_classes()
    auto = AutoModelForCausalLM.from_pretrained(out_dir)
    assert isinstance(auto, LayermoeForCausalLM)

    torch.save({"ids": ids, "want": want}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)  # the same reduction order as this test process (conftest)\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True).eval()\n"
        "assert not any(k.startswith('layermoe') for k in sys.modules)\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    print(type(m).__name__, (m(io['ids']).logits - io['want']).abs().max().item())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    name, diff = res.stdout.split()[-2:]
    assert name == "LayermoeForCausalLM" and float(diff) == 0.0


# ---------------------------------------------------------------------------------------
# Freezing and lifelong expansion
# ---------------------------------------------------------------------------------------
def test_parameter_groups_and_separate_generation_tensors(tiny_dirs):
    model = upcycle(load_base(tiny_dirs["gemma"]), NEW_EXPERTS, classifier_layers=[0])
    g1_before = {n: p for n, p in model.named_parameters() if ".experts.g1." in n}
    add_generation(model, [1, 1, 0], classifier_layers=[0])
    groups = parameter_groups(model)
    assert set(groups) == {"router", "classifier", "expert0", "experts_g1", "experts_g2", "base"}
    params = dict(model.named_parameters())
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(params)  # every parameter in exactly one group
    assert sorted(groups["experts_g1"]) == sorted(g1_before)
    assert all(params[n] is p for n, p in g1_before.items())  # same Parameter objects survive add_generation
    assert groups["experts_g2"] == [
        "lm.model.layers.0.mlp.experts.g2.gate_up_proj",
        "lm.model.layers.0.mlp.experts.g2.down_proj",
        "lm.model.layers.1.mlp.experts.g2.gate_up_proj",
        "lm.model.layers.1.mlp.experts.g2.down_proj",
    ]
    assert "lm.model.layers.1.mlp.down_proj.weight" not in params  # layer 1 became MoE in G2
    g1 = {id(params[n]) for n in groups["experts_g1"]}
    g2 = {id(params[n]) for n in groups["experts_g2"]}
    assert not g1 & g2
    assert "lm.model.layers.1.mlp.expert0.gate_proj.weight" in groups["expert0"]
    assert "lm.model.embed_tokens.weight" in groups["base"] and "lm.lm_head.weight" in groups["base"]


@pytest.mark.parametrize("router_init", ["expert0", "mean", "zeros"])
def test_add_generation_keeps_learned_rows(tiny_dirs, router_init):
    model = upcycle(load_base(tiny_dirs["mistral"]), NEW_EXPERTS, classifier_layers=[0, 2])
    perturb_experts(model)
    old_router = {i: b.router.weight.detach().clone() for i, b in model.moe_blocks().items()}
    old_cls = {i: b.classifier.weight.detach().clone() for i, b in model.moe_blocks().items() if b.classifier is not None}
    expert0 = model.moe_blocks()[0].expert0
    add_generation(model, [2, 1, 0], classifier_layers=[0], router_init=router_init)
    blocks = model.moe_blocks()
    assert model.config.new_experts == [[2, 2], [0, 1], [3, 0]]
    assert model.config.experts_per_layer == [5, 2, 4] and model.config.moe_layers == [0, 1, 2]
    assert model.expert_generation_ids(0) == [0, 1, 1, 2, 2]
    r0 = blocks[0].router.weight.detach()
    assert torch.equal(r0[:3], old_router[0])
    expected_new = {
        "expert0": old_router[0][:1].expand(2, -1),
        "mean": old_router[0].mean(0, keepdim=True).expand(2, -1),
        "zeros": torch.zeros(2, r0.shape[1]),
    }[router_init]
    assert torch.allclose(r0[3:], expected_new, atol=1e-7)
    assert torch.equal(blocks[2].router.weight.detach(), old_router[2])  # no new expert: unchanged
    # Classifier: layer 0 keeps its two learned rows and gets a third class; layer 2 loses its classifier.
    assert blocks[0].classifier.weight.shape[0] == 3
    assert torch.equal(blocks[0].classifier.weight.detach()[:2], old_cls[0])
    assert blocks[2].classifier is None and model.config.classifier_classes == 3
    # New experts are exact copies of expert 0.
    g2 = blocks[0].experts["g2"]
    want = torch.cat([expert0.gate_proj.weight, expert0.up_proj.weight])
    assert all(torch.equal(g2.gate_up_proj[e], want) for e in range(2))
    assert all(torch.equal(g2.down_proj[e], expert0.down_proj.weight) for e in range(2))
