"""The steps through the CLI on a tiny model: profile → allocate → expand → eval, bad input, relocation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from layermoe_cli.cli import app
from layermoe_cli.manifest import StepStatus
from layermoe_cli.testing import make_tiny_model
from layermoe_cli.workdir import Workdir

runner = CliRunner()
LAYERS = 4


def layermoe(workdir: Path, *args: str):
    return runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "llama", num_layers=LAYERS, shared_direction=0.05)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tiny) -> Path:
    """A work dir where profile, allocate and expand of G1 are done."""
    workdir = tmp_path_factory.mktemp("runs") / "run"
    result = layermoe(workdir, "profile", "--model", str(tiny), "--old", "en", "--new", "el,hu", "--tokens", "1500",
                      "--neuron-top-n", "40")
    assert result.exit_code == 0, result.output
    result = layermoe(workdir, "allocate", "--budget", "10", "--classifier-layers", "1")
    assert result.exit_code == 0, result.output
    result = layermoe(workdir, "expand")
    assert result.exit_code == 0, result.output
    return workdir


def manifest_of(workdir: Path):
    return Workdir(workdir).load()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_chain_records_what_later_steps_rely_on(expanded, tiny):
    manifest = manifest_of(expanded)
    g1 = manifest.generations[1]
    assert [g.index for g in manifest.generations] == [0, 1]
    assert manifest.generations[0].new_languages == ["en"]
    assert (g1.old_languages, g1.new_languages) == (["en"], ["el", "hu"])
    assert manifest.base_model.num_layers == LAYERS and manifest.base_model.path == "../../models0/tiny" or \
        Workdir(expanded).resolve(manifest.base_model.path) == tiny.resolve()
    # profile: S^i per layer is the Eq. 9 mix of the recorded pair matrix
    assert len(g1.profile.similarity) == LAYERS
    assert g1.profile.languages == ["en", "el", "hu"]
    for i, s in enumerate(g1.profile.similarity):
        m = g1.profile.matrix[i]
        new_new, new_old = m[1][2], (m[1][0] + m[2][0]) / 2
        assert s == pytest.approx((new_new + new_old) / 2, abs=1e-12)
    assert g1.profile.tokens_per_language == {"en": 1500, "el": 1500, "hu": 1500}
    # allocation: exact budget, classifier on the most similar layer
    assert sum(g1.allocation.experts_per_layer) == 10
    assert g1.allocation.new_experts_per_layer == [n - 1 for n in g1.allocation.experts_per_layer]
    top = max(range(LAYERS), key=lambda i: g1.profile.similarity[i])
    assert g1.allocation.classifier_layers == [top]
    # expansion: a checkpoint that reproduces the base model, recorded with relative paths
    assert g1.expansion.status == StepStatus.done
    assert g1.expansion.checkpoint == "g1/expanded"
    assert g1.expansion.max_abs_logit_diff <= 1e-4
    assert g1.expansion.added_parameters == g1.expansion.total_parameters - manifest.base_model.num_parameters
    for name in ("profile.png", "profile.json", "allocation.png"):
        assert (expanded / "g1" / name).is_file()
    config = json.loads((expanded / "g1" / "expanded" / "config.json").read_text())
    assert config["model_type"] == "layermoe"


def test_expanded_checkpoint_reloads_with_base_logits(expanded, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    batch = tokenizer(["Καλημέρα σας, τι κάνετε;", "Jó reggelt kívánok!"], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(tiny).eval()
    moe = AutoModelForCausalLM.from_pretrained(expanded / "g1" / "expanded").eval()
    with torch.no_grad():
        diff = (base(**batch).logits - moe(**batch).logits).abs().max().item()
    assert diff <= 1e-4


def test_rerunning_a_done_step_is_a_noop(expanded, tiny):
    before = snapshot(expanded)
    result = layermoe(expanded, "profile", "--model", str(tiny), "--old", "en", "--new", "el,hu")
    assert result.exit_code == 0
    assert "profile of G1 is done already (use --force to redo it)" in result.output
    result = layermoe(expanded, "expand")
    assert result.exit_code == 0
    assert "expansion of G1 is done already" in result.output
    assert snapshot(expanded) == before


def test_eval_measures_base_once_and_shows_no_change_right_after_expand(expanded):
    result = layermoe(expanded, "eval", "--max-tokens", "300", "--json")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert set(numbers["languages"]) == {"en", "el", "hu"}
    for lang, figures in numbers["languages"].items():
        # expanded == base right after expand: bits per byte agree to float noise
        assert figures["bpb"] == pytest.approx(figures["base_bpb"], abs=1e-5)
        assert figures["tokens"] == 300
    manifest = manifest_of(expanded)
    assert set(manifest.generations[0].eval.languages) == {"en", "el", "hu"}
    assert manifest.generations[1].eval.languages["el"].bpb == pytest.approx(numbers["languages"]["el"]["bpb"])
    assert numbers["old_avg"] == pytest.approx(numbers["languages"]["en"]["bpb"])
    assert numbers["new_avg"] == pytest.approx((numbers["languages"]["el"]["bpb"] + numbers["languages"]["hu"]["bpb"]) / 2)
    assert (expanded / "report.md").is_file()


def test_moved_workdir_continues(expanded, tmp_path):
    """Copy the work dir elsewhere (another depth) and run the next command there."""
    moved = tmp_path / "elsewhere" / "deeper" / "run"
    shutil.copytree(expanded, moved)
    result = layermoe(moved, "eval", "--max-tokens", "200", "--langs", "el", "--force")
    assert result.exit_code == 0, result.output
    manifest = manifest_of(moved)
    assert manifest.generations[1].eval.model == "g1/expanded"
    assert manifest.generations[1].eval.languages["el"].tokens == 200


# --- bad input: one line, exit code 2, the work dir as it was ------------------------------


def assert_one_line_error(result, message: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--old", "en", "--new", "xx"], "unknown language code 'xx'"),
        (["--old", "en", "--new", "en"], "is both old and new"),
        (["--old", "en"], "a new work dir needs --old and --new"),
        (["--old", "en", "--new", "el", "--data", "el=missing.txt"], "missing.txt"),
    ],
)
def test_bad_profile_input_leaves_no_workdir(tmp_path, tiny, args, message):
    workdir = tmp_path / "run"
    result = layermoe(workdir, "profile", "--model", str(tiny), *args)
    assert_one_line_error(result, message)
    assert not workdir.exists()


def test_empty_data_file_names_file_and_language(tmp_path, tiny):
    empty = tmp_path / "el.txt"
    empty.write_text("\n\n")
    result = layermoe(tmp_path / "run", "profile", "--model", str(tiny), "--old", "en", "--new", "el",
                      "--data", f"el={empty}")
    assert_one_line_error(result, str(empty))
    assert "el" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    result = layermoe(tmp_path / "run", "profile", "--model", str(tmp_path / "gpt2"), "--old", "en", "--new", "el")
    assert_one_line_error(result, "unsupported architecture 'gpt2': layermoe supports llama, qwen2, qwen3, mistral, gemma, gemma2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "3"], "expert budget 3 is smaller than the 4 layers"),
        (["--budget", "10", "--max-per-layer", "2"], "exceeds 4 layers x 2 experts per layer"),
        (["--budget", "10", "--classifier-layers", "5"], "classifier layers k=5 is outside 0..4"),
        (["--budget", "10", "--strategy", "best"], "unknown allocation strategy 'best'"),
        (["--budget", "10", "--new-experts", "6"], "give exactly one of --budget"),
        (["--strategy", "neuron", "--neuron-mapping", "linear", "--budget", "10"], "the linear neuron mapping (the authors' formula) is not budget-bound"),
        (["--budget", "10", "--min-experts", "2"], "--min-experts/--max-experts set the linear mapping"),
        (["--budget", "10", "--strategy", "neuron", "--rounding", "ceil"], "the neuron strategy always rounds exactly"),
        (["--strategy", "neuron", "--neuron-mapping", "linear", "--min-experts", "0"], "--min-experts must be at least 1"),
    ],
)
def test_bad_allocate_input_leaves_workdir_unchanged(expanded, args, message):
    before = snapshot(expanded)
    result = layermoe(expanded, "allocate", "--force", *args)
    assert_one_line_error(result, message)
    assert snapshot(expanded) == before


def test_forced_reallocation_marks_the_expansion_out_of_date(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    result = layermoe(workdir, "allocate", "--budget", "8", "--force")
    assert result.exit_code == 0, result.output
    g1 = manifest_of(workdir).generations[1]
    assert g1.allocation.experts_per_layer == [2, 2, 2, 2]
    assert g1.expansion.status == StepStatus.pending
    assert "run `layermoe expand --force` for the new allocation" in result.stderr


def test_layerwise_before_profile_names_the_fix(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    manifest = manifest_of(workdir)
    for step in ("profile", "allocation", "expansion"):
        manifest.generations[1].step(step).status = StepStatus.pending
    Workdir(workdir).save(manifest)
    before = snapshot(workdir)
    result = layermoe(workdir, "allocate", "--budget", "10")
    assert_one_line_error(result, "layerwise allocation needs the similarity profile of G1: run `layermoe profile` first")
    assert snapshot(workdir) == before
    # uniform needs no profile, and then gets no classifier layers
    result = layermoe(workdir, "allocate", "--budget", "10", "--strategy", "uniform")
    assert result.exit_code == 0, result.output
    allocation = manifest_of(workdir).generations[1].allocation
    assert allocation.experts_per_layer == [2, 3, 2, 3] or sum(allocation.experts_per_layer) == 10
    assert allocation.classifier_layers == []


def test_expand_refuses_a_foreign_output_folder(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    shutil.rmtree(workdir / "g1" / "expanded")
    (workdir / "g1" / "expanded").mkdir()
    (workdir / "g1" / "expanded" / "notes.txt").write_text("mine")
    before = snapshot(workdir)
    result = layermoe(workdir, "expand", "--force")
    assert_one_line_error(result, "exists and is not a layermoe checkpoint")
    assert snapshot(workdir) == before


def test_train_before_expand_names_the_command(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    manifest = manifest_of(workdir)
    manifest.generations[1].expansion.status = StepStatus.pending
    Workdir(workdir).save(manifest)
    result = layermoe(workdir, "train", "--stage", "1")
    assert_one_line_error(result, "expansion of G1 is not done yet (pending): run `layermoe expand` first")
    result = layermoe(expanded, "train", "--stage", "2")
    assert_one_line_error(result, "stage 1 of G1 is not done yet (pending): run `layermoe train --stage 1` first")


def test_expand_before_allocate_and_a_layer_count_mismatch(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    manifest = manifest_of(workdir)
    manifest.generations[1].allocation.status = StepStatus.pending
    Workdir(workdir).save(manifest)
    before = snapshot(workdir)
    result = layermoe(workdir, "expand", "--force")
    assert_one_line_error(result, "G1 has no allocation yet: run `layermoe allocate --budget N` first, or pass --budget to `expand`")
    assert snapshot(workdir) == before

    manifest.generations[1].allocation.status = StepStatus.done
    manifest.generations[1].allocation.experts_per_layer = [2, 2, 2]
    Workdir(workdir).save(manifest)
    before = snapshot(workdir)
    result = layermoe(workdir, "expand", "--force")
    assert_one_line_error(result, "the allocation has 3 layers but the model has 4")
    assert snapshot(workdir) == before


def test_neuron_allocation_from_the_profile(tmp_path, expanded):
    """`--strategy neuron`: Σ N^i = δ in the order of the profile's neuron counts; `--neuron-mapping linear`
    is the authors' formula with the total it reaches recorded as the budget."""
    from layermoe_cli.allocation import neuron_linear_mapping

    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    profile = manifest_of(workdir).generations[1].profile
    assert profile.neuron_top_n == 40 and len(profile.neuron_counts) == LAYERS
    assert 40 <= sum(profile.neuron_counts) <= 3 * 40  # the union of three languages' top 40
    assert set(profile.neuron_counts_by_language) == {"en", "el", "hu"}
    assert all(sum(c) == 40 for c in profile.neuron_counts_by_language.values())
    neurons = json.loads((workdir / "g1" / "profile.json").read_text())["neurons"]
    assert neurons["unique_per_layer"] == profile.neuron_counts and neurons["top_n"] == 40
    result = layermoe(workdir, "allocate", "--force", "--strategy", "neuron", "--budget", "10", "--classifier-layers", "1")
    assert result.exit_code == 0, result.output
    allocation = manifest_of(workdir).generations[1].allocation
    assert (allocation.strategy, allocation.neuron_mapping, sum(allocation.experts_per_layer)) == ("neuron", "proportional", 10)
    counts = profile.neuron_counts
    for a in range(LAYERS):
        for b in range(LAYERS):
            if counts[a] > counts[b]:
                assert allocation.experts_per_layer[a] >= allocation.experts_per_layer[b]
    result = layermoe(workdir, "allocate", "--force", "--strategy", "neuron", "--neuron-mapping", "linear",
                      "--min-experts", "1", "--max-experts", "4")
    assert result.exit_code == 0, result.output
    allocation = manifest_of(workdir).generations[1].allocation
    assert allocation.experts_per_layer == neuron_linear_mapping(counts, 1, 4).experts_per_layer
    assert allocation.budget == sum(allocation.experts_per_layer)
    assert f"reached Σ N^i = {allocation.budget}" in result.stderr
