"""G0 → G1 → G2 end to end on a tiny model: expert counts, frozen weights, router rows kept,
drift recorded at extend, a run killed between steps resumes, a work dir moved mid-chain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.manifest import StepStatus
from layermoe.core.workdir import Workdir
from layermoe.testing import make_tiny_model

runner = CliRunner()
LAYERS = 4
TRAIN = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "1"]


def layermoe(workdir: Path, *args: str):
    result = runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (args, result.output)
    return result


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run G1 fully, move the work dir, then extend to G2 and train it."""
    root = tmp_path_factory.mktemp("chain")
    tiny = make_tiny_model(root / "tiny", "llama", num_layers=LAYERS, shared_direction=0.05)
    first = root / "first"
    layermoe(first, "profile", "--model", str(tiny), "--old", "en", "--new", "el,hu", "--tokens", "600")
    layermoe(first, "allocate", "--budget", "8", "--classifier-layers", "1")
    layermoe(first, "expand")
    layermoe(first, "train", "--stage", "1", *TRAIN)
    layermoe(first, "train", "--stage", "2", *TRAIN)
    moved = root / "elsewhere" / "run"  # the work dir moves to another path mid-chain
    moved.parent.mkdir()
    shutil.move(first, moved)
    layermoe(moved, "eval", "--max-tokens", "200")  # its figures serve as the drift check's "before"
    extend = layermoe(moved, "extend", "--new", "bn,hi", "--budget", "7", "--tokens", "600", "--classifier-layers", "2")
    layermoe(moved, "train", "--stage", "1", *TRAIN)
    layermoe(moved, "train", "--stage", "2", *TRAIN)
    return moved, extend


def test_expert_counts_per_generation(chain):
    workdir, _ = chain
    manifest = Workdir(workdir).load()
    g1, g2 = manifest.generations[1], manifest.generations[2]
    assert sum(g1.allocation.experts_per_layer) == 8 and sum(g2.allocation.experts_per_layer) == 7
    assert g2.old_languages == ["en", "el", "hu"] and g2.new_languages == ["bn", "hi"]
    config = json.loads((workdir / g2.stage2.checkpoint / "config.json").read_text())
    assert config["new_experts"] == [[a, b] for a, b in zip(g1.allocation.new_experts_per_layer,
                                                             g2.allocation.new_experts_per_layer)]
    assert config["classifier_classes"] == 3  # G0, G1, G2: the lifelong prior
    assert config["classifier_layers"] == g2.allocation.classifier_layers


def test_g0_and_g1_tensors_unchanged_by_g2(chain):
    workdir, _ = chain
    manifest = Workdir(workdir).load()
    before = weights(workdir / manifest.generations[1].stage2.checkpoint)
    after = weights(workdir / manifest.generations[2].stage2.checkpoint)
    frozen = [name for name in before if "router" not in name and "classifier" not in name]
    assert any(".experts.g1." in name for name in frozen) and any("expert0" in name for name in frozen)
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    # ... while G2's own experts did train
    g2_expanded = weights(workdir / manifest.generations[2].expansion.checkpoint)
    g2_names = [n for n in after if ".experts.g2." in n]
    assert g2_names and any(not torch.equal(g2_expanded[n], after[n]) for n in g2_names)
    # the manifest's checksums were verified by training and cover the frozen G1 experts
    assert any(".experts.g1." in n for n in manifest.generations[2].stage1.frozen_checksums)


def test_router_rows_kept_at_extend(chain):
    workdir, _ = chain
    manifest = Workdir(workdir).load()
    trained = weights(workdir / manifest.generations[1].stage2.checkpoint)
    extended = weights(workdir / manifest.generations[2].expansion.checkpoint)
    routers = [n for n in trained if n.endswith("router.weight")]
    assert routers
    for name in routers:
        old_rows = trained[name].shape[0]
        assert torch.equal(extended[name][:old_rows], trained[name]), name


def test_drift_of_earlier_languages_is_recorded(chain):
    workdir, extend = chain
    metrics = Workdir(workdir).load().generations[2].expansion.metrics
    assert set(metrics["bpb_drift"]) == {"en", "el", "hu"}
    for lang, drift in metrics["bpb_drift"].items():
        assert drift == pytest.approx(metrics["bpb_after_extension"][lang] - metrics["bpb_before_extension"][lang])
    assert metrics["bpb_drift_max"] == max(abs(d) for d in metrics["bpb_drift"].values())
    assert "earlier languages right after opening G2" in extend.output


def test_drift_before_extension_is_g1s_eval_not_a_second_measurement(chain):
    workdir, extend = chain
    manifest = Workdir(workdir).load()
    g1_eval, metrics = manifest.generations[1].eval, manifest.generations[2].expansion.metrics
    assert metrics["drift_tokens"] == g1_eval.config["max_tokens"] == 200  # the cap follows G1's eval
    assert metrics["bpb_before_extension"] == {lang: g1_eval.languages[lang].bpb for lang in ("en", "el", "hu")}
    assert "bpb before extension: g1/stage2 was measured on these texts already (eval cache)" in extend.stderr
    assert "bpb after extension:" not in extend.stderr


def test_killed_recipe_resumes_where_it_stopped(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny", "llama", num_layers=LAYERS, shared_direction=0.05)
    recipe = tmp_path / "recipe.yaml"
    train = "{max_steps: 2, seq_len: 32, micro_batch_size: 2, checkpoint_every: 1}"
    recipe.write_text(f"""
model: {tiny}
device: cpu
generations:
  - old: [en]
    new: [el]
    profile: {{tokens: 400}}
    allocate: {{budget: 6}}
    stage1: {train}
    stage2: {train}
    eval: {{max_tokens: 100}}
""")
    workdir = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "layermoe", "-w", str(workdir), "run", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # (if this fails, run the same recipe by hand: `python -m layermoe -w run run recipe.yaml`)
    try:  # kill it once the expansion is recorded, i.e. between steps
        deadline = time.time() + 240
        while time.time() < deadline:
            manifest = workdir / "manifest.json"
            if manifest.exists() and '"checkpoint": "g1/expanded"' in manifest.read_text():
                break
            if proc.poll() is not None:
                pytest.fail(f"the recipe ended (exit code {proc.returncode}) before we could kill it")
            time.sleep(0.2)
        else:
            pytest.fail("the recipe never reached the expansion")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = Workdir(workdir).load().generations[1]
    assert killed.expansion.status == StepStatus.done and killed.stage2.status != StepStatus.done
    profiled_at = killed.profile.started_at

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    g1 = Workdir(workdir).load().generations[1]
    assert all(g1.step(s).status == StepStatus.done for s in ("profile", "allocation", "expansion", "stage1", "stage2", "eval"))
    assert g1.profile.started_at == profiled_at  # not redone
    assert "profile of G1 is done already" in done.stderr


def test_report_shows_the_drift_at_extension(chain, tmp_path):
    from layermoe.evaluation.report import render_report

    workdir, _ = chain
    manifest = Workdir(workdir).load()
    text = render_report(manifest.model_dump(mode="json"), workdir)
    assert "## Earlier languages when a generation opens" in text
    drift = manifest.generations[2].expansion.metrics["bpb_drift"]
    for lang, value in drift.items():
        assert f"| {lang} |" in text and f"{value:+.4f}" in text


def test_extend_again_is_a_noop_and_a_learned_language_is_refused(chain):
    workdir, _ = chain
    before = (workdir / "manifest.json").read_bytes()
    again = runner.invoke(app, ["-w", str(workdir), "extend", "--new", "bn,hi", "--budget", "7"])
    assert again.exit_code == 0
    assert "G2 (bn, hi) is open already" in again.output
    taken = runner.invoke(app, ["-w", str(workdir), "extend", "--new", "el,ta", "--budget", "7"])
    assert taken.exit_code == 2
    assert "el (G1) is already learned: a new generation needs new languages" in taken.stderr
    assert (workdir / "manifest.json").read_bytes() == before


def test_expand_again_on_g2_keeps_its_settings_and_refuses_another_top_k(chain, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(chain[0], workdir)
    before = (workdir / "manifest.json").read_bytes()
    refused = runner.invoke(app, ["-w", str(workdir), "expand", "--force", "--top-k", "1"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip().splitlines() == [
        "error: --top-k 1: the top-k is chosen when G1 is expanded, and G2 keeps that of the model it extends (2): "
        "drop --top-k"]
    assert (workdir / "manifest.json").read_bytes() == before
    again = layermoe(workdir, "expand", "--force", "--top-k", "2")
    config = json.loads((workdir / "g2" / "expanded" / "config.json").read_text())
    assert config["classifier_classes"] == 3  # extend's lifelong classifier, not `expand`'s binary default
    # the tokenizer of the prepared data is the expansion's: both prepare steps are built on it too
    assert "prepare1, stage1, prepare2, stage2 and eval of G2 are now pending" in again.stderr or \
        "prepare1, stage1, prepare2 and stage2 of G2 are now pending" in again.stderr
    g2 = Workdir(workdir).load().generations[2]
    assert g2.stage1.status == g2.stage2.status == StepStatus.pending


def test_demo_ending_shows_each_new_language_base_vs_newest(chain, capsys):
    """One prompt per learned language, continued in one batch per model: the same text as one prompt at a time."""
    from layermoe.modeling.generation import continue_text
    from layermoe.pipeline.common import load_checkpoint, texts_for
    from layermoe.pipeline.generate import demo_prompt, show_new_languages

    workdir, _ = chain
    manifest = Workdir(workdir).load()
    cells = show_new_languages(Workdir(workdir), manifest, device="cpu", max_new_tokens=6)
    shown = capsys.readouterr().out
    for label in ("el (G1)", "hu (G1)", "bn (G2)", "hi (G2)", "base", "G2 (g2/stage2)"):
        assert label in shown
    prompt = demo_prompt(texts_for(Workdir(workdir), manifest.generations[1], "el", "heldout", limit=1)[0])
    for column, model_dir in ((0, None), (1, workdir / "g2" / "stage2")):
        if model_dir is None:
            from layermoe.pipeline.common import load_base

            model, tok = load_base(Workdir(workdir), manifest)
        else:
            model, tok = load_checkpoint(model_dir)
        assert cells[0, column] == continue_text(model, tok, prompt, max_new_tokens=6).text  # batched = alone


def test_extend_with_neuron_allocation_and_routed_init(chain, tmp_path):
    """G3 on a copy of the chain: `--strategy neuron` spends δ exactly, and `--expert-init routed` starts each
    layer's new experts as copies of the expert the profile saw the new languages use most (router row too)."""
    from layermoe.profiling.expert_use import most_routed_experts

    workdir = tmp_path / "run"
    shutil.copytree(chain[0], workdir)
    layermoe(workdir, "extend", "--new", "tr", "--budget", "6", "--tokens", "400", "--drift-tokens", "100",
             "--classifier-layers", "1", "--strategy", "neuron", "--expert-init", "routed")
    g3 = Workdir(workdir).load().generations[3]
    assert (g3.allocation.strategy, sum(g3.allocation.experts_per_layer)) == ("neuron", 6)
    assert set(g3.profile.routing_mass) == {"en", "el", "hu", "bn", "hi", "tr"}
    sources = most_routed_experts(g3.profile.routing_mass, ["tr"])
    assert g3.expansion.expert_init == "routed" and g3.expansion.expert_sources == sources
    assert g3.expansion.config["router_init"] == "source"
    before = weights(workdir / Workdir(workdir).load().generations[2].stage2.checkpoint)
    after = weights(workdir / g3.expansion.checkpoint)
    config = json.loads((workdir / g3.expansion.checkpoint / "config.json").read_text())
    copied = 0
    for layer, (source, new) in enumerate(zip(sources, g3.allocation.new_experts_per_layer)):
        if new == 0:
            continue
        prefix = f"lm.model.layers.{layer}.mlp."
        counts = config["new_experts"][layer][:-1]  # earlier generations' experts in this layer
        if source == 0:
            gate_up = torch.cat([before[prefix + "expert0.gate_proj.weight"], before[prefix + "expert0.up_proj.weight"]])
            down = before[prefix + "expert0.down_proj.weight"]
        else:
            generation = next(g for g in range(len(counts)) if source <= sum(counts[: g + 1]))
            local = source - 1 - sum(counts[:generation])
            gate_up = before[f"{prefix}experts.g{generation + 1}.gate_up_proj"][local]
            down = before[f"{prefix}experts.g{generation + 1}.down_proj"][local]
        assert torch.equal(after[prefix + "experts.g3.gate_up_proj"][0], gate_up)
        assert torch.equal(after[prefix + "experts.g3.down_proj"][0], down)
        router = after[prefix + "router.weight"]
        assert torch.equal(router[-1], router[source])
        copied += 1
    assert copied == sum(1 for n in g3.allocation.new_experts_per_layer if n)
