"""The steps through the CLI on a tiny model: profile → allocate → expand → eval, bad input, relocation."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.manifest import StepStatus
from layermoe.core.workdir import Workdir
from layermoe.testing import make_tiny_model

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
# (the cases that are one command each are rows of tests/test_bad_input.py; here those that check more)


def assert_one_line_error(result, message: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    return lines[0]


def test_forced_reallocation_marks_the_expansion_out_of_date(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    result = layermoe(workdir, "allocate", "--budget", "8", "--force")
    assert result.exit_code == 0, result.output
    g1 = manifest_of(workdir).generations[1]
    assert g1.allocation.experts_per_layer == [2, 2, 2, 2]
    assert g1.expansion.status == StepStatus.pending
    assert "note: allocation of G1 ran again, so expansion" in result.stderr


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


@pytest.mark.parametrize("failure, free", [
    # what torch.save raised when the disk filled up under a real `compare` run
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1182434752 vs 1182434640"), 2_000_000),
    (OSError(28, "No space left on device"), 50_000_000_000),  # ENOSPC says it whatever the free space (a quota)
])
def test_a_full_disk_while_training_is_one_line_and_training_resumes(tmp_path, expanded, monkeypatch, failure, free):
    import collections

    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    real_save, real_usage = torch.save, shutil.disk_usage

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("usage", "total used free")(10**12, 10**12 - free, free))
    train = ["train", "--stage", "1", "--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "1"]
    result = layermoe(workdir, *train)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.stderr.strip().splitlines()[-1]
    shown = "2.0 MB" if free == 2_000_000 else "50.0 GB"
    assert last == (f"error: the disk holding {workdir} is full ({shown} free; {str(failure).splitlines()[0]}): "
                    "free some space, then run the command again (training resumes from its last complete checkpoint)")
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    result = layermoe(workdir, *train)
    assert result.exit_code == 0, result.output
    assert manifest_of(workdir).generations[1].stage1.status == StepStatus.done


def test_an_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path, expanded, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)

    def broken(*args, **kwargs):
        raise RuntimeError("some bug")

    monkeypatch.setattr(torch, "save", broken)
    result = layermoe(workdir, "train", "--stage", "1", "--max-steps", "2", "--seq-len", "32", "--micro-batch", "2",
                      "--checkpoint-every", "1")
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "some bug"  # a bug stays a traceback


def test_data_files_are_found_after_the_workdir_moves_deeper(tmp_path, tiny):
    """A --data file is stored relative to the work dir and absolute; the absolute path is the fallback, said once."""
    from layermoe.data import load_texts

    data = tmp_path / "data"
    data.mkdir()
    greek = data / "el.txt"
    greek.write_text("\n".join(load_texts("el", "builtin", limit=60)) + "\n", encoding="utf-8")
    workdir = tmp_path / "run"
    result = layermoe(workdir, "profile", "--model", str(tiny), "--old", "en", "--new", "el", "--data", f"el={greek}",
                      "--tokens", "200")
    assert result.exit_code == 0, result.output
    record = manifest_of(workdir).generations[1].data["el"]
    assert record.spec == "../data/el.txt" and record.absolute_path == str(greek.resolve())

    moved = tmp_path / "deeper" / "run"
    moved.parent.mkdir()
    shutil.move(workdir, moved)
    result = layermoe(moved, "profile", "--force", "--tokens", "200")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "data for 'el'" in line]
    assert notes == [f"note: data for 'el': ../data/el.txt is not there from {moved}; using the absolute path "
                     f"{greek.resolve()} recorded with it"], result.stderr

    shutil.move(data, tmp_path / "gone")
    result = layermoe(moved, "profile", "--force", "--tokens", "200")
    assert_one_line_error(result, f"data for 'el' is neither at {(moved / '../data/el.txt').resolve()} (stored relative to "
                                  f"the work dir as ../data/el.txt) nor at {greek.resolve()}")


def test_profile_again_makes_allocation_and_expansion_pending_and_keeps_their_outputs(tmp_path, expanded):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    result = layermoe(workdir, "profile", "--force", "--tokens", "1500")
    assert result.exit_code == 0, result.output
    g1 = manifest_of(workdir).generations[1]
    assert g1.profile.status == StepStatus.done
    assert (g1.allocation.status, g1.expansion.status) == (StepStatus.pending, StepStatus.pending)
    assert (workdir / "g1" / "expanded" / "model.safetensors").is_file()  # kept until replaced
    # "allocation and expansion", or "allocation, expansion and eval" when an earlier test evaluated this work dir
    assert re.search(r"note: profile of G1 ran again, so allocation(,| and) expansion", result.stderr)
    assert "now pending (old outputs stay until replaced)" in result.stderr
    result = layermoe(workdir, "allocate", "--budget", "10", "--classifier-layers", "1")  # no --force needed now
    assert result.exit_code == 0, result.output


# --- issue 10, items 8-9: each bad input is one line, exit 2, the work dir unchanged --------------


def test_an_absurd_budget_and_top_k_are_refused(tmp_path, expanded, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    before = snapshot(workdir)
    assert_one_line_error(layermoe(workdir, "allocate", "--force", "--budget", "1000000000000"),
                          "expert budget 1000000000000 exceeds 4 layers x 64 experts per layer = 256")
    most = max(manifest_of(workdir).generations[1].allocation.experts_per_layer)
    assert_one_line_error(layermoe(workdir, "expand", "--force", "--top-k", "99"),
                          f"--top-k 99 is more than the most experts any layer has ({most})")
    import layermoe.pipeline.expand as expand_step

    monkeypatch.setattr(expand_step, "available_memory", lambda device: 1000)
    assert_one_line_error(layermoe(workdir, "expand", "--force"), "of memory, but only 1.0 kB are free on cpu")
    assert snapshot(workdir) == before


# --- issue 10, items 11, 14, 16: allocation classifiers and the demo summary (no model needed) ----


def _two_generations(tmp_path):
    """A manifest whose G1 put experts (and its classifier) on layers 0 and 2, and whose G2 profile is done."""
    from layermoe.core.manifest import BaseModelRecord, Generation, Manifest

    manifest = Manifest(
        base_model=BaseModelRecord(spec="m", kind="local", num_layers=4, hidden_size=32, intermediate_size=64,
                                   num_parameters=100_000),
        generations=[Generation(index=0, new_languages=["en"]),
                     Generation(index=1, old_languages=["en"], new_languages=["el"]),
                     Generation(index=2, old_languages=["en", "el"], new_languages=["bn"])])
    g1, g2 = manifest.generations[1], manifest.generations[2]
    for step in ("profile", "allocation", "expansion"):
        g1.step(step).status = StepStatus.done
    g1.allocation.experts_per_layer, g1.allocation.new_experts_per_layer = [2, 1, 2, 1], [1, 0, 1, 0]
    g1.allocation.classifier_layers = [0]
    g2.profile.status = StepStatus.done
    g2.profile.similarity = [0.9, 0.3, 0.8, 0.3]  # layers 0 and 2 are the most similar; G2's experts go to 1 and 3
    workdir = Workdir(tmp_path / "run")
    workdir.save(manifest)
    return workdir, manifest


def test_g2_classifiers_go_to_the_most_similar_moe_layers_of_the_extended_model(tmp_path):
    from layermoe.pipeline.allocate import allocate_generation
    from layermoe.pipeline.options import AllocateOptions

    workdir, manifest = _two_generations(tmp_path)
    g2 = manifest.generations[2]
    allocate_generation(workdir, manifest, g2, AllocateOptions(budget=6, classifier_layers=2))
    assert g2.allocation.new_experts_per_layer == [0, 1, 0, 1]
    # every layer is MoE after G2 (0 and 2 from G1): the two most similar get the classifiers
    assert g2.allocation.classifier_layers == [0, 2]


def test_uniform_allocation_has_no_classifier_unless_asked(tmp_path):
    from layermoe.pipeline.allocate import allocate_generation
    from layermoe.pipeline.options import AllocateOptions

    workdir, manifest = _two_generations(tmp_path)
    g2 = manifest.generations[2]
    allocate_generation(workdir, manifest, g2, AllocateOptions(budget=8, strategy="uniform"))
    assert g2.allocation.classifier_layers == []  # the MoE-LPR baseline routes by LPR alone
    allocate_generation(workdir, manifest, g2, AllocateOptions(budget=8, strategy="uniform", classifier_layers=1, force=True))
    assert g2.allocation.classifier_layers == [0]


def test_demo_summary_measures_g2_forgetting_against_the_model_before_it(capsys):
    from layermoe.core.manifest import Generation, LanguageEval, Manifest
    from layermoe.pipeline.recipe import _demo_summary

    def figures(**bpb):
        return {lang: LanguageEval(bpb=value) for lang, value in bpb.items()}

    manifest = Manifest(generations=[Generation(index=0, new_languages=["en"]),
                                     Generation(index=1, old_languages=["en"], new_languages=["el"]),
                                     Generation(index=2, old_languages=["en", "el"], new_languages=["bn"])])
    manifest.generations[0].eval.languages = figures(en=1.0, el=3.0, bn=4.0)
    manifest.generations[1].eval.languages = figures(en=1.1, el=2.0)  # G1 learned el (gain 1.0)
    manifest.generations[2].eval.languages = figures(en=1.2, el=2.1, bn=3.0)
    _demo_summary(manifest)
    rows = {line.split("│")[1].strip().split(" ")[0]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("│ G")}
    # G2's old languages before G2 = G1's model: (1.1 + 2.0) / 2 = 1.550 → (1.2 + 2.1) / 2 = 1.650, forgetting +0.100
    assert "1.550 → 1.650" in rows["G2"] and "+0.100" in rows["G2"]
    assert "1.000 → 1.100" in rows["G1"] and "+0.100" in rows["G1"]  # G1: before = the base model
    assert "4.000 → 3.000" in rows["G2"]  # new languages: base → after


# --- eval on the user's own test sets, the eval cache, generate --------------------------


def test_own_test_sets_equal_a_direct_computation_and_a_rerun_is_cached(tmp_path, expanded):
    from layermoe.evaluation import evaluate_languages
    from layermoe.pipeline.common import load_checkpoint

    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    greek, swahili = tmp_path / "el_test.txt", tmp_path / "sw_test.txt"
    greek.write_text("Καλημέρα σας, τι κάνετε σήμερα;\nΤο βιβλίο είναι στο τραπέζι.\n", encoding="utf-8")
    swahili.write_text("Habari ya asubuhi, rafiki yangu.\n", encoding="utf-8")
    args = ["eval", "--max-tokens", "200", "--data", f"el={greek}", "--data", f"sw={swahili}", "--json"]
    result = layermoe(workdir, *args)
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    el, sw = (numbers["test_sets"][f"{lang}=../{path.name}"] for lang, path in (("el", greek), ("sw", swahili)))
    assert (el["transfer"], el["generation"], sw["transfer"], sw["generation"]) == (False, 1, True, None)
    model, tok = load_checkpoint(workdir / "g1" / "expanded")
    direct = evaluate_languages(model, tok, {"el": greek.read_text().splitlines(), "sw": swahili.read_text().splitlines()})
    assert el["bpb"] == direct["el"].bpb and sw["bpb"] == direct["sw"].bpb  # in full: no token cap on test sets
    assert el["tokens"] == direct["el"].tokens and el["documents"] == 2
    assert el["base_bpb"] == pytest.approx(el["bpb"], abs=1e-5)  # expanded == base right after expand
    assert set(numbers["languages"]) == {"en", "el", "hu"}  # the held-out split beside them
    report = (workdir / "report.md").read_text()
    assert "## Your test sets" in report and "| sw=../sw_test.txt | sw | transfer |" in report

    before = snapshot(workdir)
    again = layermoe(workdir, *args)
    assert again.exit_code == 0, again.output
    assert "eval of G1 is up to date: the model (sha256 " in again.stderr
    assert json.loads(again.stdout) == numbers
    assert snapshot(workdir) == before  # nothing measured, nothing written


def test_eval_dtype_loads_the_models_in_it_and_caches_per_dtype(tmp_path, expanded):
    """`eval --dtype bfloat16` (the default on CUDA) equals a direct bf16 computation and is cached apart from float32."""
    import torch

    from layermoe.core.devices import resolve_dtype
    from layermoe.evaluation import evaluate_languages
    from layermoe.pipeline.common import load_checkpoint
    from layermoe.pipeline.evaluate import held_out_texts

    assert (resolve_dtype("auto", "cuda"), resolve_dtype("auto", "cpu")) == (torch.bfloat16, torch.float32)
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    fp32 = layermoe(workdir, "eval", "--max-tokens", "200", "--json")
    assert fp32.exit_code == 0, fp32.output
    bf16 = layermoe(workdir, "eval", "--max-tokens", "200", "--json", "--dtype", "bf16")
    assert bf16.exit_code == 0, bf16.output
    assert "up to date" not in bf16.stderr  # another dtype is another measurement, not a cache hit
    g1 = manifest_of(workdir).generations[1]
    assert (g1.eval.config["dtype"], manifest_of(workdir).generations[0].eval.config["dtype"]) == ("bfloat16", "bfloat16")
    model, tok = load_checkpoint(workdir / "g1" / "expanded", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    direct = evaluate_languages(model, tok, held_out_texts(Workdir(workdir), manifest_of(workdir), ["el"], 200), max_tokens=200)
    in_bf16, in_fp32 = (json.loads(r.stdout)["languages"]["el"]["bpb"] for r in (bf16, fp32))
    assert in_bf16 == direct["el"].bpb and in_bf16 != in_fp32 and in_bf16 == pytest.approx(in_fp32, rel=0.02)
    again = layermoe(workdir, "eval", "--max-tokens", "200", "--json")  # float32 again: from the cache
    assert "every figure comes from the cache" in again.stderr and json.loads(again.stdout) == json.loads(fp32.stdout)


def test_eval_cache_hits_by_checksum_and_misses_when_the_weights_change(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    from layermoe.modeling.base import ModelSource
    from layermoe.pipeline.eval_cache import EvalCache, EvalJob, ModelUnderTest, measure_cached

    model_dir = tmp_path / "model"
    shutil.copytree(tiny, model_dir)
    loads = []

    def under_test() -> ModelUnderTest:
        def loader(device):
            loads.append(device)
            from layermoe.modeling.base import load_model

            return load_model(ModelSource("local", str(model_dir), path=model_dir), device=device)

        return ModelUnderTest("m", ModelSource("local", str(model_dir), path=model_dir), loader)

    cache = EvalCache(tmp_path / "cache")
    jobs = [EvalJob("en", "en", ["Hello world, this is a test."]), EvalJob("el", "el", ["Καλημέρα κόσμε"])]
    first = measure_cached(cache, under_test(), jobs, device="cpu")
    assert first.measured == ["en", "el"] and len(loads) == 1
    hit = measure_cached(cache, under_test(), jobs, device="cpu")  # a new process would see the same: keyed by checksum
    assert hit.measured == [] and len(loads) == 1 and hit.evals == first.evals
    other_texts = [EvalJob("en", "en", ["Another text entirely."])]
    assert measure_cached(cache, under_test(), other_texts, device="cpu").measured == ["en"]
    weights = load_file(str(model_dir / "model.safetensors"))
    name = next(n for n in weights if "embed" in n)
    weights[name] = weights[name] + 0.01  # same size and name, other numbers
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    changed = measure_cached(cache, under_test(), jobs, device="cpu")
    assert changed.measured == ["en", "el"] and len(loads) == 3
    assert changed.evals["en"].bpb != first.evals["en"].bpb


def test_generate_streams_greedy_text_and_compares_with_base_while_the_lock_is_held(expanded, tiny):
    from layermoe.modeling.generation import continue_text
    from layermoe.pipeline.common import load_checkpoint

    model, tok = load_checkpoint(expanded / "g1" / "expanded")
    expected = continue_text(model, tok, "Καλημέρα", max_new_tokens=6).text
    before = snapshot(expanded)
    with Workdir(expanded).lock():  # e.g. `train` running: a read-only command still works
        alone = layermoe(expanded, "generate", "--prompt", "Καλημέρα", "--model", "g1", "--max-new-tokens", "6")
        both = layermoe(expanded, "generate", "-p", "Καλημέρα", "--compare", "base", "--max-new-tokens", "6")
    assert alone.exit_code == 0 and both.exit_code == 0, (alone.output, both.output)
    assert alone.stdout == f"Καλημέρα{expected}\n"
    assert "base" in both.stdout and "G1 (g1/expanded)" in both.stdout
    assert both.stdout.count(expected.strip()[:4]) == 2  # expanded == base right after expand: the same text twice
    before.pop(".layermoe.lock", None)
    assert snapshot(expanded) == before


def test_generate_shows_a_model_path_as_given(expanded, tiny, tmp_path, monkeypatch):
    """A model folder named like Rich markup is named as it is, not styled away."""
    shutil.copytree(tiny, tmp_path / "tiny[red]")
    monkeypatch.chdir(tmp_path)  # a short relative path: a column header that fits on one line
    alone = layermoe(expanded, "generate", "-p", "Hello", "--model", "tiny[red]", "--max-new-tokens", "2")
    assert alone.exit_code == 0, alone.output
    assert "tiny[red]:" in alone.stderr
    both = layermoe(expanded, "generate", "-p", "Hello", "--model", "tiny[red]", "--compare", "base", "--max-new-tokens", "2")
    assert both.exit_code == 0, both.output
    assert "tiny[red]" in both.stdout


def test_generate_in_bf16_equals_the_bf16_model_directly(expanded, monkeypatch):
    """`--dtype auto` is bf16 on CUDA; asked for on the CPU, the model is loaded in bf16 and the text is its."""
    from layermoe.modeling.generation import continue_text
    from layermoe.pipeline import evaluate
    from layermoe.pipeline.common import load_checkpoint

    model, tok = load_checkpoint(expanded / "g1" / "expanded", dtype=torch.bfloat16)
    expected = continue_text(model, tok, "Καλημέρα", max_new_tokens=6).text
    loaded = []
    monkeypatch.setattr(evaluate, "load_checkpoint", lambda path, **kw: loaded.append(kw["dtype"]) or load_checkpoint(path, **kw))
    result = layermoe(expanded, "generate", "-p", "Καλημέρα", "--model", "g1", "--max-new-tokens", "6", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert loaded == [torch.bfloat16] and "KV cache, bfloat16 weights" in result.stderr
    assert result.stdout == f"Καλημέρα{expected}\n"


def test_neuron_allocation_from_the_profile(tmp_path, expanded):
    """`--strategy neuron`: Σ N^i = δ in the order of the profile's neuron counts; `--neuron-mapping linear`
    is the authors' formula with the total it reaches recorded as the budget."""
    from layermoe.allocation.strategies import neuron_linear_mapping

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
