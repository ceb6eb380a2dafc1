"""Two-stage training: what trains, nothing lost (frozen checksums, crash + resume), DDP, and
that a short stage 1 + stage 2 run teaches the new language without moving the old one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layermoe.data import builtin_corpus_path
from layermoe.modeling import add_generation, load_layermoe, save_layermoe, upcycle
from layermoe.testing import make_tiny_model
from layermoe.training.checkpoint import (
    FrozenWeightsChanged,
    checkpoint_dirs,
    latest_checkpoint,
    prepare_staging,
    publish,
)
from layermoe.training.config import TrainConfig
from layermoe.training.loop import freeze_for_stage, train_stage

REPO = Path(__file__).resolve().parents[1]
GENS = {"en": 0, "el": 1}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _corpus(per_language=120, held_out=40):
    texts = {}
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        for line in f:
            lang, _, text = line.rstrip("\n").partition("\t")
            if lang in GENS:
                texts.setdefault(lang, []).append(text)
    train = {l: t[:per_language] for l, t in texts.items()}
    test = {l: t[-held_out:] for l, t in texts.items()}
    return train, test


def _expanded(tmp_path, new_experts=(2, 1), classifier_layers=(0,), language_direction=None, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_tiny_model(tmp_path / "base", "llama", num_layers=2, **overrides)
    dense = AutoModelForCausalLM.from_pretrained(base)
    if language_direction is not None:
        # A real LM's hidden states tell languages apart; a random tiny one's do not. Give the
        # tokens that only the new language uses a shared offset, as a pretrained model would.
        tok = AutoTokenizer.from_pretrained(base)
        train, _ = _corpus(1000)
        used = {lang: {i for t in docs for i in tok(t)["input_ids"]} for lang, docs in train.items()}
        only_new = sorted(used["el"] - used["en"])
        direction = torch.randn(dense.config.hidden_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            dense.get_input_embeddings().weight[only_new] += language_direction * direction / direction.norm()
    model = upcycle(dense, list(new_experts), classifier_layers=list(classifier_layers))
    return save_layermoe(model, tmp_path / "expanded", AutoTokenizer.from_pretrained(base))


def _weights(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _small_config(stage, **kw):
    base = dict(stage=stage, seq_len=32, micro_batch_size=4, learning_rate=1e-3, log_every=2, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- what trains


def test_trainable_sets_per_stage_exact_names_and_counts(tmp_path):
    model = load_layermoe(_expanded(tmp_path))
    stage1 = freeze_for_stage(model, 1, 1)
    assert sorted(stage1) == sorted([
        "lm.model.layers.0.mlp.router.weight",
        "lm.model.layers.0.mlp.experts.g1.gate_up_proj",
        "lm.model.layers.0.mlp.experts.g1.down_proj",
        "lm.model.layers.1.mlp.router.weight",
        "lm.model.layers.1.mlp.experts.g1.gate_up_proj",
        "lm.model.layers.1.mlp.experts.g1.down_proj",
    ])
    # hidden 32, intermediate 64: an expert is 2*64*32 + 32*64 = 6144; routers 3x32 + 2x32
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * 6144 + 5 * 32
    stage2 = freeze_for_stage(model, 2, 1)
    assert sorted(stage2) == sorted([
        "lm.model.layers.0.mlp.router.weight",
        "lm.model.layers.0.mlp.classifier.weight",
        "lm.model.layers.1.mlp.router.weight",
    ])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * 32 + 2 * 32
    # Lifelong: generation 2's stage 1 trains G2's experts only, G1's stay frozen.
    add_generation(model, [1, 0])
    stage1_g2 = freeze_for_stage(model, 1, 2)
    assert sorted(n for n in stage1_g2 if "experts" in n) == [
        "lm.model.layers.0.mlp.experts.g2.down_proj",
        "lm.model.layers.0.mlp.experts.g2.gate_up_proj",
    ]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".g1." in n)


# ---------------------------------------------------------------- frozen integrity


def test_tampered_frozen_weight_raises_and_nothing_is_saved(tmp_path, monkeypatch):
    import layermoe.training.setup as modeling  # where train_stage looks up load_layermoe

    loaded = []
    real_load = modeling.load_layermoe

    def spy(*a, **k):
        loaded.append(real_load(*a, **k))
        return loaded[-1]

    monkeypatch.setattr(modeling, "load_layermoe", spy)

    def tamper(record):
        if record["step"] == 2:
            with torch.no_grad():
                loaded[0].lm.model.layers[1].mlp.expert0.up_proj.weight[0, 0] += 1e-3

    train, _ = _corpus(30)
    with pytest.raises(
        FrozenWeightsChanged,
        match=r"^frozen weights changed during training: lm\.model\.layers\.1\.mlp\.expert0\.up_proj\.weight; the result was not saved",
    ):
        train_stage(_expanded(tmp_path), tmp_path / "out", train, GENS, 1, _small_config(1, max_steps=3), tmp_path / "work", on_step=tamper)
    assert not (tmp_path / "out").exists()


def test_stage1_saves_classifier_routing_off_and_stage2_turns_it_on(tmp_path):
    """Stage 1 never trains the classifier: its output must route by the router alone (issue 10, item 10)."""
    expanded = _expanded(tmp_path, new_experts=(1, 1), classifier_layers=(0, 1))
    train, _ = _corpus(20)
    train_stage(expanded, tmp_path / "s1", train, GENS, 1, _small_config(1, max_steps=1), tmp_path / "w1")
    s1 = load_layermoe(tmp_path / "s1")
    assert s1.config.classifier_routing is False
    assert all(b.classifier_routing is False for b in s1.moe_blocks().values())
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["classifier_routing"] is False
    train_stage(tmp_path / "s1", tmp_path / "s2", train, GENS, 1, _small_config(2, max_steps=1), tmp_path / "w2")
    s2 = load_layermoe(tmp_path / "s2")
    assert s2.config.classifier_routing is True
    assert all(b.classifier_routing is True for b in s2.moe_blocks().values() if b.classifier is not None)


# ---------------------------------------------------------------- crash and resume


def test_checkpoint_dirs_ignore_incomplete_and_staging(tmp_path):
    root = tmp_path / "ckpt"
    for step in (3, 6):
        prepare_staging(root, step)
        publish(root, step, keep=5)
    (root / "step-000009").mkdir()  # no COMPLETE: a crash in the middle of an older-style write
    prepare_staging(root, 12)  # crashed while staging
    assert [p.name for p in checkpoint_dirs(root)] == ["step-000003", "step-000006"]
    assert latest_checkpoint(root).name == "step-000006"
    prepare_staging(root, 15)
    publish(root, 15, keep=2)
    assert [p.name for p in checkpoint_dirs(root)] == ["step-000006", "step-000015"]
    assert not (root / ".tmp-step-000012").exists()


_CRASHING_RUN = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from layermoe.training.config import TrainConfig
from layermoe.training.loop import train_stage
a = json.loads(Path(sys.argv[1]).read_text())
kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
def on_step(record):
    if record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
r = train_stage(a["model_dir"], a["output_dir"], a["texts"], a["gens"], 1, TrainConfig(**a["config"]), a["work_dir"], on_step=on_step)
Path(a["result"]).write_text(json.dumps(r.to_dict()))
"""


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    expanded = _expanded(tmp_path)
    train, _ = _corpus(40)
    config = _small_config(1, max_steps=8, checkpoint_every=3, grad_accum_steps=2, warmup_steps=2)
    reference = train_stage(expanded, tmp_path / "ref_out", train, GENS, 1, config, tmp_path / "ref_work")

    script = tmp_path / "crashing_run.py"
    script.write_text(_CRASHING_RUN)
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps(
            dict(model_dir=str(expanded), output_dir=str(tmp_path / "out"), texts=train, gens=GENS,
                 config=config.model_dump(mode="json"), work_dir=str(tmp_path / "work"), result=str(tmp_path / "result.json"))
        )
    )
    crashed = subprocess.run([sys.executable, str(script), str(args)], env={**_env(), "KILL_AT_STEP": "7"}, capture_output=True, text=True)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "work" / "checkpoints").name == "step-000006"
    assert not (tmp_path / "out").exists()

    resumed = subprocess.run([sys.executable, str(script), str(args)], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resumed_from_step"] == 6
    assert result["tokens_seen"] == reference.tokens_seen
    assert result["final_losses"] == pytest.approx(reference.final_losses, rel=1e-6)
    want, got = _weights(tmp_path / "ref_out"), _weights(tmp_path / "out")
    assert want.keys() == got.keys()
    trained = [k for k in want if ".experts.g1." in k or ".router." in k]
    assert any(not torch.equal(want[k], _weights(expanded)[k]) for k in trained)  # training moved them
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
    # the JSONL log covers every logged step once before the crash and once after resuming
    steps = [json.loads(l)["step"] for l in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


# ---------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_ddp_ends_with_identical_weights_on_both_ranks(tmp_path):
    expanded = _expanded(tmp_path)
    train, _ = _corpus(40)
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps(
            dict(model_dir=str(expanded), output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                 texts_by_language=train, generation_of_language=GENS, current_generation=1,
                 config=_small_config(1, max_steps=4, micro_batch_size=2).model_dump(mode="json"))
        )
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/cpu_ddp_2proc.yaml"),
           "--main_process_port", str(_free_port()), "-m", "layermoe.training.run_stage", "--args-json", str(args)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "work" / "train_result.json").read_text())
    digests = result["trainable_checksum_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert result["data"]["blocks_per_step"] == 4  # 2 per rank x 2 ranks
    assert result["tokens_seen"] == 4 * 4 * 32
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_global_batch_is_the_same_sequences_per_step_on_one_and_two_processes(tmp_path):
    """`global_batch_sequences` fixes what a step trains on; the accumulation follows the launch
    (the recipes' micro x accumulation x world gave 8x more steps on one GPU than the authors')."""
    expanded = _expanded(tmp_path)
    train, _ = _corpus(40)
    config = _small_config(1, max_steps=2, micro_batch_size=2, global_batch_sequences=8)
    one = train_stage(expanded, tmp_path / "out1", train, GENS, 1, config, tmp_path / "work1")
    assert one.data["blocks_per_step"] == one.data["global_batch_sequences"] == 8  # 2 x 4 accumulation x 1
    args = tmp_path / "args.json"
    args.write_text(json.dumps(dict(model_dir=str(expanded), output_dir=str(tmp_path / "out2"), work_dir=str(tmp_path / "work2"),
                                    texts_by_language=train, generation_of_language=GENS, current_generation=1,
                                    config=config.model_dump(mode="json"))))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/cpu_ddp_2proc.yaml"),
           "--main_process_port", str(_free_port()), "-m", "layermoe.training.run_stage", "--args-json", str(args)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "work2" / "train_result.json").read_text())
    assert two["data"]["blocks_per_step"] == 8  # 2 x 2 accumulation x 2 processes
    assert two["tokens_seen"] == one.tokens_seen  # the same blocks, step for step


# ---------------------------------------------------------------- does it learn


def _loss_by_language(model_dir, texts):
    from transformers import AutoTokenizer

    model = load_layermoe(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    with torch.no_grad():
        for lang, docs in texts.items():
            total, count = 0.0, 0
            for doc in docs:
                ids = torch.tensor([tok(doc)["input_ids"][:64]])
                n = ids.shape[1] - 1
                total += model(input_ids=ids, labels=ids).loss.item() * n
                count += n
            out[lang] = total / count
    return out


def test_stage1_then_stage2_learns_new_language_and_returns_old_one_home(tmp_path):
    # initializer_range 0.2: a random lm_head of std 0.02 leaves the logits too small to learn much
    expanded = _expanded(tmp_path, new_experts=(1, 1), classifier_layers=(0, 1), language_direction=2.0, initializer_range=0.2)
    train, test = _corpus(200)
    before = _loss_by_language(expanded, test)
    s1 = train_stage(expanded, tmp_path / "s1", train, GENS, 1, _small_config(1, max_steps=40, learning_rate=1e-2), tmp_path / "w1")
    assert s1.data["languages"] == ["el"]
    after1 = _loss_by_language(tmp_path / "s1", test)
    s2 = train_stage(tmp_path / "s1", tmp_path / "s2", train, GENS, 1, _small_config(2, max_steps=30, learning_rate=2e-2), tmp_path / "w2")
    assert s2.data["languages"] == ["el", "en"]
    after2 = _loss_by_language(tmp_path / "s2", test)
    assert after1["el"] < before["el"] - 0.25  # stage 1 taught the new language
    assert after2["el"] < before["el"] - 0.25  # ... and stage 2 kept it
    # old language: routed home to expert 0 by classifier + LPR, its loss is back near the base
    assert abs(after2["en"] - before["en"]) < 0.05
