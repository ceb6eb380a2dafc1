"""`layermoe run` on a compare recipe (what `layermoe compare` runs), on a tiny model: the four
variants, their expert and parameter counts, the table's arithmetic, a re-run that skips what is
done, and the dense full fine-tune of `train_stage`; the table and plot from a fixture; the plan
of `--budgets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.workdir import Workdir
from layermoe.pipeline.compare.plan import CompareSpec, expert_budgets, plan_variants, round_half_up
from layermoe.testing import make_tiny_model

runner = CliRunner()
LAYERS = 4
TRAIN = "{max_steps: 2, seq_len: 32, micro_batch_size: 2, checkpoint_every: 1, learning_rate: 1.0e-2}"


def write_recipe(path: Path, model: Path, compare: str = "{baseline_new_experts_per_layer: 2, layermoe_share: 0.4}",
                 allocate: str = "{classifier_layers: 1}") -> Path:
    path.write_text(f"""
model: {model}
device: cpu
compare: {compare}
generations:
  - old: [en]
    new: [el, hu]
    profile: {{tokens: 400, neuron_top_n: 40}}
    allocate: {allocate}
    stage1: {TRAIN}
    stage2: {TRAIN}
    eval: {{max_tokens: 100}}
""")
    return path


def layermoe(workdir: Path, *args: str, code: int = 0):
    result = runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "250"})
    assert result.exit_code == code, (args, result.output)
    return result


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tiny = make_tiny_model(root / "tiny", "llama", num_layers=LAYERS, shared_direction=0.05)
    recipe = write_recipe(root / "recipe.yaml", tiny)
    workdir = root / "run"
    first = layermoe(workdir, "run", str(recipe))
    snapshot = {name: Workdir(workdir / "compare" / name).load() for name in ("layermoe", "neuronmoe", "moe-lpr")}
    dense_record = (workdir / "compare" / "dense" / "train.json").read_text()
    evals = {p.name: p.read_text() for p in (workdir / "compare" / "eval").iterdir()}
    second = layermoe(workdir, "run", str(recipe))
    return dict(root=root, tiny=tiny, recipe=recipe, workdir=workdir, first=first, second=second, snapshot=snapshot,
                dense_record=dense_record, evals=evals)


def test_budgets_round_the_share_of_the_baseline():
    assert expert_budgets(4, CompareSpec()) == {"baseline_new_experts": 8, "layermoe_new_experts": 3, "layermoe_budget": 7}
    assert expert_budgets(30, CompareSpec()) == {"baseline_new_experts": 60, "layermoe_new_experts": 24, "layermoe_budget": 54}
    assert expert_budgets(5, CompareSpec(baseline_new_experts_per_layer=1, layermoe_share=0.5))["layermoe_new_experts"] == 3
    assert round_half_up(2.5) == 3 and round_half_up(2.4999) == 2


def test_table_has_the_four_variants_with_the_right_expert_counts(compared):
    table = json.loads((compared["workdir"] / "compare.json").read_text())
    rows = {row["variant"]: row for row in table["variants"]}
    assert [row["variant"] for row in table["variants"]] == ["layermoe", "neuronmoe", "moe-lpr", "dense"]
    assert rows["layermoe"]["new_experts"] == round(0.4 * LAYERS * 2) == 3
    neuron = compared["snapshot"]["neuronmoe"].generations[1]
    assert (neuron.allocation.strategy, neuron.allocation.neuron_mapping, neuron.allocation.budget) == ("neuron", "proportional", LAYERS + 3)
    assert rows["neuronmoe"]["new_experts"] == 3 and rows["neuronmoe"]["budget"] == LAYERS + 3
    assert len(neuron.allocation.classifier_layers) == 1  # as LayerMoE: the most similar of its own MoE layers
    assert (compared["workdir"] / "compare.png").is_file()
    assert rows["moe-lpr"]["new_experts"] == LAYERS * 2
    assert rows["moe-lpr"]["new_experts_per_layer"] == [2] * LAYERS
    assert rows["dense"]["new_experts"] == 0
    manifests = compared["snapshot"]
    assert manifests["layermoe"].generations[1].allocation.strategy == "layerwise"
    assert manifests["layermoe"].generations[1].allocation.budget == LAYERS + 3
    assert manifests["moe-lpr"].generations[1].allocation.classifier_layers == []
    assert len(manifests["layermoe"].generations[1].allocation.classifier_layers) == 1
    # every variant trained stage 1 on the same tokens
    tokens = {row["variant"]: row["tokens_seen"][0] for row in table["variants"]}
    assert len(set(tokens.values())) == 1 and tokens["dense"] > 0
    assert [row["steps"] for row in table["variants"]] == [[2, 2], [2, 2], [2, 2], [2]]
    text = compared["first"].output
    for title in ("LayerMoE", "NeuronMoE", "MoE-LPR", "dense fine-tune"):
        assert title in text
    markdown = (compared["workdir"] / "compare.md").read_text()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 5  # header + four rows


def test_parameter_counts(compared):
    table = json.loads((compared["workdir"] / "compare.json").read_text())
    rows = {row["variant"]: row for row in table["variants"]}
    config = json.loads((compared["tiny"] / "config.json").read_text())
    base = sum(t.numel() for t in load_file(str(compared["tiny"] / "model.safetensors")).values())
    assert table["base"]["total_parameters"] == base
    assert rows["dense"]["total_parameters"] == base and rows["dense"]["trainable_parameters"] == base
    dense = json.loads(compared["dense_record"])
    assert dense["trainable_parameters"] == base and dense["frozen_parameters"] == 0
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    per_expert = 3 * hidden * inter
    for name in ("layermoe", "neuronmoe", "moe-lpr"):
        allocation = compared["snapshot"][name].generations[1].allocation
        routers = sum(hidden * n for n in allocation.experts_per_layer if n > 1)
        classifiers = len(allocation.classifier_layers) * hidden * 2
        added = rows[name]["new_experts"] * per_expert + routers + classifiers
        assert rows[name]["total_parameters"] == base + added
        assert rows[name]["trainable_parameters"] == rows[name]["new_experts"] * per_expert + routers + classifiers
        stage1 = compared["snapshot"][name].generations[1].stage1
        assert stage1.metrics["trainable_parameters"] == rows[name]["new_experts"] * per_expert + routers


def test_dense_fine_tune_changed_every_tensor(compared):
    before = load_file(str(compared["tiny"] / "model.safetensors"))
    after = load_file(str(compared["workdir"] / "compare" / "dense" / "model" / "model.safetensors"))
    assert set(before) == set(after)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def test_forgetting_and_gain_are_the_differences_of_the_figures(compared):
    table = json.loads((compared["workdir"] / "compare.json").read_text())
    base = table["base"]
    old, new = table["old_languages"], table["new_languages"]
    assert old == ["en"] and new == ["el", "hu"]
    assert base["old_avg"] == pytest.approx(base["bpb"]["en"])
    assert base["new_avg"] == pytest.approx((base["bpb"]["el"] + base["bpb"]["hu"]) / 2)
    for row in table["variants"]:
        bpb = row["bpb"]
        assert row["old_avg"] == pytest.approx(bpb["en"])
        assert row["new_avg"] == pytest.approx((bpb["el"] + bpb["hu"]) / 2)
        assert row["forgetting"] == pytest.approx(row["old_avg"] - base["old_avg"])
        assert row["gain"] == pytest.approx(base["new_avg"] - row["new_avg"])
        cached = json.loads(compared["evals"][f"{row['variant']}.json"])
        assert cached["bpb"] == bpb and cached["key"]["max_tokens"] == 100
        assert f"{row['old_avg']:.4f}" in compared["first"].output
    # the base figures were measured once, for all variants, on the same texts
    assert sorted(compared["evals"]) == ["base.json", "dense.json", "layermoe.json", "moe-lpr.json", "neuronmoe.json"]


def test_rerun_skips_finished_variants(compared):
    second = compared["second"].output
    for name in ("layermoe", "neuronmoe", "moe-lpr"):
        before = compared["snapshot"][name].generations[1]
        after = Workdir(compared["workdir"] / "compare" / name).load().generations[1]
        for step in ("profile", "allocation", "expansion", "stage1", "stage2"):
            assert after.step(step).started_at == before.step(step).started_at, (name, step)
    assert second.count("stage 2 of G1 is done already") == 3
    assert "dense fine-tune is done already" in second
    assert (compared["workdir"] / "compare" / "dense" / "train.json").read_text() == compared["dense_record"]
    for name, text in compared["evals"].items():
        assert (compared["workdir"] / "compare" / "eval" / name).read_text() == text
    assert second.count("is up to date") == 5
    first_table = json.loads((compared["workdir"] / "compare.json").read_text())
    assert [row["old_avg"] for row in first_table["variants"]] == [
        json.loads(compared["evals"][f"{v}.json"])["bpb"]["en"] for v in ("layermoe", "neuronmoe", "moe-lpr", "dense")]


def test_changed_share_is_refused_not_silently_reused(compared, tmp_path):
    recipe = write_recipe(tmp_path / "other.yaml", compared["tiny"], compare="{layermoe_share: 0.5}")
    result = layermoe(compared["workdir"], "run", str(recipe), code=2)
    assert "was allocated with layerwise δ = 7, not layerwise δ = 8: delete that folder" in result.output


def test_recipe_may_not_set_the_budget_itself(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2)
    recipe = write_recipe(tmp_path / "r.yaml", tiny, allocate="{budget: 5}")
    result = layermoe(tmp_path / "run", "run", str(recipe), code=2)
    assert "a compare recipe sets `allocate.budget` itself" in result.output
    assert not (tmp_path / "run" / "compare").exists()


def test_dense_model_refuses_stage_2(tmp_path):
    from layermoe.core.errors import LayermoeError
    from layermoe.training.config import TrainConfig
    from layermoe.training.loop import train_stage

    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2)
    with pytest.raises(LayermoeError, match="is a dense model: it has no router, so only stage 1"):
        train_stage(tiny, tmp_path / "out", {"el": ["abc"]}, {"en": 0, "el": 1}, 1, TrainConfig(stage=2), tmp_path / "w")


def test_budgets_plan_one_layermoe_per_delta():
    spec = CompareSpec(budgets=[72, 36, 54, 36])
    plan = plan_variants(30, spec, {"classifier_layers": 9})
    assert [v["name"] for v in plan] == ["layermoe-36", "layermoe", "layermoe-72", "neuronmoe", "moe-lpr"]
    assert [v["allocate"].get("budget") for v in plan] == [36, 54, 72, 54, None]  # 54: the share's δ, its folder reused
    assert plan[3]["allocate"] == {"classifier_layers": 9, "strategy": "neuron", "neuron_mapping": "proportional", "budget": 54}
    assert plan[4]["allocate"] == {"classifier_layers": 0, "strategy": "uniform", "new_experts": 60}
    linear = plan_variants(30, CompareSpec(neuron_mapping="linear"), {})[1]["allocate"]
    assert linear == {"strategy": "neuron", "neuron_mapping": "linear", "min_experts": 1, "max_experts": 6}
    from layermoe.core.errors import LayermoeError

    with pytest.raises(LayermoeError, match="^expert budget 20 is smaller than the 30 layers"):
        plan_variants(30, CompareSpec(budgets=[20, 54]), {})


def test_table_and_plot_from_a_fixture(tmp_path):
    """_summarise, the markdown and compare.png from recorded figures: no model, no training."""
    from layermoe.core.manifest import Generation, Manifest
    from layermoe.pipeline.compare.render import compare_markdown, compare_points, plot_compare
    from layermoe.pipeline.compare.render import summarise as _summarise

    def manifest(strategy, per_layer, steps, mapping=None):
        g1 = Generation(index=1, old_languages=["en"], new_languages=["el", "hu"])
        g1.allocation.strategy, g1.allocation.neuron_mapping = strategy, mapping
        g1.allocation.new_experts_per_layer, g1.allocation.budget = per_layer, len(per_layer) + sum(per_layer)
        g1.stage1.steps, g1.stage2.steps, g1.stage1.tokens_seen, g1.stage2.tokens_seen = steps, 1, 4096, 512
        return Manifest(generations=[Generation(index=0, new_languages=["en"]), g1])

    variants = [{"name": "layermoe-6", "title": "LayerMoE δ=6"}, {"name": "layermoe", "title": "LayerMoE δ=7"},
                {"name": "neuronmoe", "title": "NeuronMoE"}, {"name": "moe-lpr", "title": "MoE-LPR"}]
    manifests = {"layermoe-6": manifest("layerwise", [1, 1, 0, 0], 3), "layermoe": manifest("layerwise", [2, 1, 0, 0], 3),
                 "neuronmoe": manifest("neuron", [0, 0, 1, 2], 3, "proportional"), "moe-lpr": manifest("uniform", [2] * 4, 3)}
    bpb = {"base": (1.50, 3.00, 3.20), "layermoe-6": (1.49, 2.90, 3.00), "layermoe": (1.48, 2.80, 3.00),
           "neuronmoe": (1.52, 2.70, 2.90), "moe-lpr": (1.50, 2.60, 2.80), "dense": (1.60, 2.50, 2.70)}
    trained = {"base": 0, "layermoe-6": 2_000, "layermoe": 3_000, "neuronmoe": 3_000, "moe-lpr": 8_000, "dense": 50_000}
    figures = {name: {"bpb": dict(zip(("en", "el", "hu"), values)), "total_parameters": 50_000 + trained[name],
                      "trained_parameters": trained[name]} for name, values in bpb.items()}
    dense = {"steps": 3, "tokens_seen": 4096}
    table = _summarise(manifests, variants, dense, figures, {"baseline_new_experts": 8, "layermoe_new_experts": 3,
                       "layermoe_budget": 7}, CompareSpec(budgets=[6, 7]), 100)
    rows = table["variants"]
    assert [r["variant"] for r in rows] == ["layermoe-6", "layermoe", "neuronmoe", "moe-lpr", "dense"]
    assert [r["new_experts"] for r in rows] == [2, 3, 3, 8, 0]
    assert rows[2]["strategy"] == "neuron (proportional)" and rows[2]["budget"] == 7
    assert rows[2]["gain"] == pytest.approx(3.1 - 2.8) and rows[2]["forgetting"] == pytest.approx(0.02)
    assert rows[4]["steps"] == [3] and rows[0]["steps"] == [3, 1]
    markdown = compare_markdown(table)
    assert markdown.splitlines()[0] == "# LayerMoE δ=6 vs LayerMoE δ=7 vs NeuronMoE vs MoE-LPR vs dense fine-tune"
    assert "| NeuronMoE | 3 | 53,000 | 3,000 | 3 + 1 | 1.5200 | 2.8000 | +0.0200 | +0.3000 |" in markdown
    assert "LayerMoE: Eq. 10 at δ = 6, 7; NeuronMoE: experts proportional to each layer's language-specific neurons at δ = 7." in markdown
    points = compare_points(table)
    assert points[2] == ("NeuronMoE", 3000, pytest.approx(0.3), pytest.approx(0.02))
    assert [p[1] for p in points] == [2000, 3000, 3000, 8000, 50000]
    path = plot_compare(table, tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_command_refuses_bad_budgets_before_any_work(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=LAYERS)
    recipe = write_recipe(tmp_path / "r.yaml", tiny)
    result = layermoe(tmp_path / "run", "compare", str(recipe), "--budgets", "6,x", code=2)
    assert "--budgets takes whole numbers separated by commas, not '6,x'" in result.output
    result = layermoe(tmp_path / "run", "compare", str(recipe), "--budgets", "3,6", code=2)
    assert "expert budget 3 is smaller than the 4 layers" in result.output
    assert not (tmp_path / "run" / "compare").exists()


def test_a_vocabulary_variant_is_measured_on_the_same_text(tmp_path):
    """LayerMoE beside LayerMoE + vocabulary: every model reads the same bytes, the old languages keep their
    tokens, the new ones need fewer, and the speeds are reported; no dense run when `variants` leaves it out."""
    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2, shared_direction=0.05)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny,
                          compare="{variants: [layermoe, layermoe-vocab], vocabulary_new_tokens: 30}")
    workdir = tmp_path / "run"
    result = layermoe(workdir, "run", str(recipe))
    table = json.loads((workdir / "compare.json").read_text())
    assert [row["variant"] for row in table["variants"]] == ["layermoe", "layermoe-vocab"]
    assert not (workdir / "compare" / "dense").exists() and not (workdir / "compare" / "moe-lpr").exists()
    assert table["equal_text"] is True
    evals = {name: json.loads((workdir / "compare" / "eval" / f"{name}.json").read_text())
             for name in ("base", "layermoe", "layermoe-vocab")}
    assert evals["base"]["bytes"] == evals["layermoe"]["bytes"] == evals["layermoe-vocab"]["bytes"]
    assert sum(evals["base"]["tokens"][x] for x in ("en", "el", "hu")) <= 3 * 100  # the base tokenizer's cap
    assert evals["layermoe-vocab"]["tokens"]["en"] == evals["layermoe"]["tokens"]["en"]  # old text: the same tokens
    for lang in ("el", "hu"):
        assert evals["layermoe-vocab"]["tokens"][lang] < evals["layermoe"]["tokens"][lang]
    vocab = table["variants"][1]
    assert vocab["new_bytes_per_token"] == pytest.approx(
        sum(evals["layermoe-vocab"]["bytes"][x] for x in ("el", "hu")) / sum(evals["layermoe-vocab"]["tokens"][x] for x in ("el", "hu")))
    assert vocab["new_bytes_per_token"] > table["variants"][0]["new_bytes_per_token"] == pytest.approx(
        table["base"]["new_bytes_per_token"])
    config = json.loads((tiny / "config.json").read_text())
    rows_trained = 30 * config["hidden_size"] * (1 if config.get("tie_word_embeddings") else 2)
    assert vocab["trainable_parameters"] == table["variants"][0]["trainable_parameters"] + rows_trained
    for row in table["variants"]:
        assert row["train_bytes_per_second"] > 0 and row["generation_characters_per_second"] > 0
        generated = evals[row["variant"]]["generation"]
        assert set(generated) == {"el", "hu"} and all(g["tokens"] == 48 for g in generated.values())
    markdown = (workdir / "compare.md").read_text()
    assert "| New bytes/token | train bytes/s | gen chars/s |" in markdown
    assert "| en (old) |" in markdown and "| 1.00× |" in markdown  # old text: the same tokens
    assert "LayerMoE + vocabulary" in result.output


def test_unknown_compare_variant_is_one_line(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=2)
    recipe = write_recipe(tmp_path / "r.yaml", tiny, compare="{variants: [layermoe, vocab]}")
    result = layermoe(tmp_path / "run", "run", str(recipe), code=2)
    assert ("recipe `compare.variants`: unknown variant 'vocab'; the variants are layermoe, layermoe-vocab, neuronmoe, "
            "moe-lpr, dense") in result.output
    recipe = write_recipe(tmp_path / "r.yaml", tiny, compare="{variants: [layermoe-vocab]}")
    result = layermoe(tmp_path / "run", "run", str(recipe), code=2)
    assert "names layermoe-vocab: set compare.vocabulary_new_tokens too" in result.output
    assert not (tmp_path / "run" / "compare").exists()
