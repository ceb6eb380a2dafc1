"""The authors' operating points, as options: each against the reference it claims to reproduce
(transformers' Mixtral loss, the authors' LPR formula, their global batch, replay, G2 and profile)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.data.selection import DataSelection
from layermoe.training.config import TrainConfig
from layermoe.training.losses import load_balancing_loss, lpr_loss

runner = CliRunner()


# ---------------------------------------------------------------- load balancing (finding 2)


@pytest.mark.parametrize("num_experts", [2, 3, 5])
def test_mixtral_balance_form_is_transformers_mixtral_loss_and_twice_ours_at_k2(num_experts):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(37, num_experts, generator=torch.Generator().manual_seed(num_experts))
    mask = torch.ones(37, dtype=torch.bool)
    ours = load_balancing_loss(logits, mask, top_k=2)
    mixtral = load_balancing_loss(logits, mask, top_k=2, form="mixtral")
    reference = load_balancing_loss_func((logits,), num_experts=num_experts, top_k=2)
    assert mixtral.item() == pytest.approx(float(reference), rel=1e-6)
    assert (mixtral / ours).item() == pytest.approx(2.0, abs=1e-6)


# ---------------------------------------------------------------- LPR (finding 3)


def _authors_lpr(logits: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """MoE-LPR / LayerMoE code: cross-entropy with target expert 0, applied to the router's probabilities."""
    probs = logits.float().softmax(-1)[old]
    return torch.nn.functional.cross_entropy(probs, torch.zeros(len(probs), dtype=torch.long))


def test_authors_lpr_form_is_their_double_softmax_and_nan_free_without_old_tokens():
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    generation = torch.tensor([0, 1, 0, 1, 1, 0, -100, 1, 0])
    experts = torch.tensor([0, 1, 1, 1])
    got = lpr_loss(logits, generation, experts, current_generation=1, form="authors")
    assert got.item() == pytest.approx(_authors_lpr(logits, generation == 0).item(), rel=1e-6)
    ours = lpr_loss(logits, generation, experts, current_generation=1)
    assert ours.item() == pytest.approx(-logits.log_softmax(-1)[generation == 0, 0].mean().item(), rel=1e-6)
    # a batch without old tokens: their code's mean over nothing is NaN; ours and the option give 0, gradient 0
    fresh = logits.clone().requires_grad_(True)
    none_old = lpr_loss(fresh, torch.ones(9, dtype=torch.long), experts, current_generation=1, form="authors")
    none_old.backward()
    assert none_old.item() == 0.0 and torch.equal(fresh.grad, torch.zeros_like(fresh))


def test_the_paper_prior_pulls_7_to_10_times_harder_than_the_authors_code_at_p0_01():
    """The gradient on expert 0's logit at p_0 = 0.1 (the rest shared equally)."""
    ratios = {}
    for num_experts in (2, 3, 5):
        rest = math.log(0.9 / (num_experts - 1))
        logits = torch.tensor([[math.log(0.1)] + [rest] * (num_experts - 1)], requires_grad=True)
        grads = {}
        for form in ("nll", "authors"):
            logits.grad = None
            lpr_loss(logits, torch.tensor([0]), torch.tensor([0] + [1] * (num_experts - 1)), 1, form=form).backward()
            grads[form] = -logits.grad[0, 0].item()
        ratios[num_experts] = grads["nll"] / grads["authors"]
    assert all(7.0 <= r <= 10.0 for r in ratios.values()), ratios


def test_lpr_on_g0_tokens_only_leaves_g1_tokens_without_a_prior():
    """The authors' G2: G1's tokens (el, hu, tr) get no routing prior; ours gives them experts <= G1."""
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    experts = torch.tensor([0, 1, 1, 2, 2])
    generation = torch.tensor([0, 1, 2, 1])
    g0_only = lpr_loss(logits, generation, experts, current_generation=2, prior_for="g0")
    assert g0_only.item() == pytest.approx(-logits.log_softmax(-1)[0, 0].item(), rel=1e-6)
    earlier = lpr_loss(logits, generation, experts, current_generation=2)
    allowed_g1 = logits.log_softmax(-1)[[1, 3]][:, :3].logsumexp(-1)
    want = (-logits.log_softmax(-1)[0, 0] - allowed_g1.sum()) / 3
    assert earlier.item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------- global batch (finding 4)


def test_a_global_batch_in_sequences_sets_the_accumulation_for_the_launch():
    config = TrainConfig(stage=1, micro_batch_size=8, global_batch_sequences=512)
    assert config.for_world_size(1).grad_accum_steps == 64
    assert config.for_world_size(2).grad_accum_steps == 32
    assert config.for_world_size(8).grad_accum_steps == 8  # the authors: 8 GPUs x 8 x 8
    from layermoe.core.errors import LayermoeError

    with pytest.raises(LayermoeError, match=r"^a global batch of 512 sequences is not a whole number of micro-batches "
                                            r"of 8 on 3 processes \(24 per accumulation step\): choose a global batch "
                                            r"divisible by 24, or another --micro-batch$"):
        config.for_world_size(3)
    assert TrainConfig(stage=1, grad_accum_steps=4).for_world_size(2).grad_accum_steps == 4  # unset: as given


# ---------------------------------------------------------------- replay (finding 5)


def test_per_generation_replay_gives_g1_languages_the_authors_100k_documents():
    from layermoe.data.prepare import _budget

    done = [{"language": "bn", "documents": 100_000}, {"language": "hi", "documents": 100_000}]
    default = DataSelection(stage=2)
    assert _budget("el", 1, ["bn", "hi"], default, done).documents == 50_000  # what G2 did before: G1 halved
    authors = DataSelection(stage=2, replay_docs_by_generation={0: 50_000, 1: 100_000})
    assert _budget("el", 1, ["bn", "hi"], authors, done).documents == 100_000
    assert _budget("en", 0, ["bn", "hi"], authors, done).documents == 50_000
    assert _budget("bn", 2, ["bn", "hi"], authors, done).documents == 100_000  # new languages: docs_per_new_language
    config = TrainConfig(stage=2, replay_docs_by_generation={0: 50_000, 1: 100_000})  # a flat recipe key
    assert config.data.replay_docs_by_generation == {0: 50_000, 1: 100_000}
    assert TrainConfig(**json.loads(json.dumps(config.model_dump(mode="json")))) == config  # the manifest round trip
    # unset, it leaves the cache key of data prepared before it existed as it was
    assert "replay_docs_by_generation" not in DataSelection(stage=2).key_fields()


# ---------------------------------------------------------------- manual allocation (finding 1)


QWEN_G1_TOTALS = "5,4,3,5,4,3,2,3,3,2,2,2,2,2,2,2,2,3,3,4,4,4,3,3"


def _profiled(tmp_path, layers: int = 4) -> Path:
    from layermoe.testing import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=layers, shared_direction=2.0)
    workdir = tmp_path / "run"
    result = runner.invoke(app, ["-w", str(workdir), "profile", "--model", str(tiny), "--old", "en", "--new", "el",
                                 "--tokens", "300", "--neuron-top-n", "0"])
    assert result.exit_code == 0, result.output
    return workdir


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_manual_allocation_is_recorded_as_given_and_checked(tmp_path):
    workdir = _profiled(tmp_path)
    before = _tree(workdir)
    bad = [
        (["--experts-per-layer", "3,2,1"], "--experts-per-layer has 3 counts but the model has 4 layers: give one total per layer, expert 0 included"),
        (["--experts-per-layer", "3,0,1,2"], "--experts-per-layer gives layer 1 0 experts: every layer keeps expert 0, so each total is at least 1"),
        (["--experts-per-layer", "3,2,1,2", "--classifier-at", "2"], "--classifier-at 2: layer 2 gets no new expert (it stays dense), so a routing classifier there would decide nothing: put classifiers on MoE layers"),
        (["--experts-per-layer", "3,2,1,2", "--classifier-at", "7"], "--classifier-at 7: the model has layers 0..3"),
        (["--experts-per-layer", "3,2,1,2", "--budget", "8"], "--experts-per-layer gives the counts itself: drop --budget/--new-experts (δ is their sum)"),
        (["--experts-per-layer", "3,x"], "--experts-per-layer takes whole numbers separated by commas (or a file of them), not '3,x'"),
        (["--strategy", "manual", "--budget", "8"], "--strategy manual takes its counts from --experts-per-layer 5,4,3,... (expert 0 included)"),
    ]
    for args, message in bad:
        result = runner.invoke(app, ["-w", str(workdir), "allocate", *args])
        assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", (args, result.output)
        assert _tree(workdir) == before
    (tmp_path / "counts.txt").write_text("3 2\n1 2\n")
    result = runner.invoke(app, ["-w", str(workdir), "allocate", "--experts-per-layer", str(tmp_path / "counts.txt"),
                                 "--classifier-at", "0,3"])
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "manifest.json").read_text())["generations"][1]["allocation"]
    assert record["strategy"] == "manual" and record["experts_per_layer"] == [3, 2, 1, 2] and record["budget"] == 8
    assert record["classifier_layers"] == [0, 3] and record["new_experts_per_layer"] == [2, 1, 0, 1]


def test_the_published_qwen_totals_parse_as_72():
    from layermoe.allocation.strategies import allocate_manual, parse_layer_list

    totals = parse_layer_list(QWEN_G1_TOTALS, "--experts-per-layer")
    assert sum(allocate_manual(totals, 24).experts_per_layer) == 72


# ---------------------------------------------------------------- G2 as the authors ran it (finding 6)


def test_router_reinit_draws_every_row_afresh(tmp_path):
    from transformers import AutoModelForCausalLM

    from layermoe.modeling import add_generation, upcycle
    from layermoe.testing import make_tiny_model

    base = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", "llama", num_layers=2)).eval()
    model = upcycle(base, [2, 1])
    learned = {i: b.router.weight.detach().clone() for i, b in model.moe_blocks().items()}
    add_generation(model, [1, 1], router_init="reinit", classifier_classes=2)
    for i, block in model.moe_blocks().items():
        w = block.router.weight
        assert w.shape[0] == learned[i].shape[0] + 1
        assert not torch.allclose(w[: learned[i].shape[0]], learned[i])  # the learned rows are gone too
        fan_out, fan_in = w.shape
        assert w.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.25)  # Xavier normal's scale


# ---------------------------------------------------------------- the profile's context (finding 7)


def test_the_authors_profile_context_file_order_whole_documents_with_bos():
    from layermoe.profiling.similarity import sample_sequences
    from layermoe.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.add_bos_token = True  # a Llama-like tokenizer that prepends BOS
    docs = [f"document number {i} " + "word " * (5 * i) for i in range(1, 8)]
    ids = [tok(d)["input_ids"] for d in docs]
    authors = sample_sequences(tok, docs, 10_000, 0, 16, include_bos=True, document_order="file", long_documents="truncate")
    assert [s[:3] for s in authors] == [i[:3] for i in ids]  # file order, one sequence per document
    assert all(len(s) <= 16 for s in authors) and authors[-1] == ids[-1][:16]  # cut at the cap, the rest dropped
    ours = sample_sequences(tok, docs, 10_000, 0, 16)
    assert len(ours) > len(docs)  # split into pieces instead


# ---------------------------------------------------------------- a paper-style recipe, end to end


def test_a_recipe_with_the_authors_settings_runs_end_to_end_on_a_tiny_model(tmp_path):
    """Manual totals and classifier layers, the authors' losses, a global batch, then a G2 as they ran it
    (cumulative totals, binary classifier, router drawn afresh, G0-only prior, G1 replayed per generation)."""
    from layermoe.testing import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=4, shared_direction=2.0)
    stage = ("seq_len: 32, micro_batch_size: 2, global_batch_sequences: 4, max_steps: 2, checkpoint_every: 0, "
             "report_to: none, learning_rate: 1.0e-3")
    (tmp_path / "paper.yaml").write_text(f"""
name: tiny-paper
model: {tiny}
device: cpu
generations:
  - old: [en]
    new: [el]
    profile: {{tokens: 300, batch_tokens: 512, document_order: file, long_documents: truncate, max_document_tokens: 64,
              include_bos: true, neuron_top_n: 0}}
    allocate: {{experts_per_layer: [3, 2, 1, 2], classifier_at: [0, 3]}}
    expand: {{top_k: 2, classifier_granularity: sequence}}
    stage1: {{{stage}, balance_form: mixtral}}
    stage2: {{{stage}, lpr_form: authors, docs_per_new_language: 30, docs_per_old_language: 20}}
    eval: {{max_tokens: 200}}
  - new: [hu]
    profile: {{tokens: 300, batch_tokens: 512, document_order: file, neuron_top_n: 0}}
    allocate: {{total_experts_per_layer: [4, 3, 2, 2], classifier_at: [0, 1]}}
    expand: {{classifier: binary, router_init: reinit}}
    stage1: {{{stage}, balance_form: mixtral}}
    stage2: {{{stage}, lpr_form: authors, lpr_tokens: g0, docs_per_new_language: 30,
             replay_docs_by_generation: {{0: 10, 1: 30}}}}
    eval: {{max_tokens: 200}}
""")
    result = runner.invoke(app, ["-w", str(tmp_path / "run"), "run", str(tmp_path / "paper.yaml")])
    assert result.exit_code == 0, result.output[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    g1, g2 = manifest["generations"][1], manifest["generations"][2]
    assert g1["allocation"]["strategy"] == "manual" and g1["allocation"]["experts_per_layer"] == [3, 2, 1, 2]
    assert g1["allocation"]["classifier_layers"] == [0, 3]
    assert g2["allocation"]["new_experts_per_layer"] == [1, 1, 1, 0]  # totals minus what G1 left
    assert g2["allocation"]["classifier_layers"] == [0, 1]
    assert g1["profile"]["config"]["document_order"] == "file"
    for record in (g1["stage1"], g1["stage2"], g2["stage1"], g2["stage2"]):
        assert record["status"] == "done" and record["metrics"]["data"]["global_batch_sequences"] == 4
        assert record["config"]["grad_accum_steps"] == 2  # 4 sequences = 2 per step x 2 accumulation x 1 process
    assert g2["stage2"]["config"]["lpr_tokens"] == "g0" and g2["stage2"]["config"]["lpr_form"] == "authors"
    replay = g2["prepare2"]["documents_per_language"]
    assert replay["en"] == 10 and replay["el"] == 30  # G0 at 10, G1 at 30 documents, as asked per generation
    config = json.loads((tmp_path / "run" / "g2" / "stage2" / "config.json").read_text())
    assert config["classifier_classes"] == 2 and config["classifier_layers"] == [0, 1]
