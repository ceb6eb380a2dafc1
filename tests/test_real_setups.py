"""Real setups, as users run them (issue 23): clean checkpoints, trackers, several nodes, the eval table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.testing import make_tiny_model

runner = CliRunner()
TRAIN = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--report-to", "none"]


def layermoe(workdir: Path, *args: str):
    return runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "llama", num_layers=2, shared_direction=0.05)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tiny) -> Path:
    """A work dir where profile, allocate and expand of G1 are done."""
    workdir = tmp_path_factory.mktemp("runs") / "run"
    for args in (["profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "400", "--neuron-top-n", "0"],
                 ["allocate", "--budget", "4", "--classifier-layers", "1"], ["expand"]):
        result = layermoe(workdir, *args)
        assert result.exit_code == 0, result.output
    return workdir


def copy_of(expanded: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(expanded, workdir)
    return workdir


# ---------------------------------------------------------------- points 4 and 5: clean checkpoints


def assert_clean_checkpoint(checkpoint: Path, tiny: Path) -> None:
    """No path of this machine, no loading option, no run setting in what a checkpoint carries."""
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["base_config"]["_name_or_path"] == tiny.name  # the base's name, not where it lies here
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    for key in ("local_files_only", "is_local", "max_length", "stride", "truncation_strategy", "pad_to_multiple_of"):
        assert key not in tokenizer_config, (checkpoint.name, key)
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())
    assert tokenizer_json["truncation"] is None and tokenizer_json["padding"] is None
    for path in checkpoint.iterdir():
        if path.suffix == ".json":
            assert str(tiny.parent) not in path.read_text(), path.name


LOAD = """
import sys
from transformers import AutoTokenizer, PreTrainedTokenizerFast
path = sys.argv[1]
remote = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
plain = PreTrainedTokenizerFast.from_pretrained(path)  # no remote code at all
text = "Καλημέρα, good morning"
assert remote(text)["input_ids"] == plain(text)["input_ids"]
import layermoe.modeling  # noqa: E402,F401  (registers the model type: AutoTokenizer asks nothing)
assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == plain(text)["input_ids"]
print("loaded", type(remote).__name__)
"""


def test_checkpoints_carry_no_local_path_and_the_tokenizer_loads_without_a_prompt(expanded, tiny, tmp_path):
    workdir = copy_of(expanded, tmp_path)
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output
    for name in ("expanded", "stage1"):
        checkpoint = workdir / "g1" / name
        assert_clean_checkpoint(checkpoint, tiny)
        done = subprocess.run([sys.executable, "-c", LOAD, str(checkpoint)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        assert "loaded" in done.stdout
        assert "Do you wish to run the custom code" not in done.stdout + done.stderr
        assert "model of type" not in done.stderr  # transformers' warning about a model type ''


# ---------------------------------------------------------------- point 1: several nodes


def _launch_node(rank: int, workdir: Path, port: int, *args: str) -> subprocess.Popen:
    """One "node" of a two-node launch on this machine: its own accelerate launch of one process."""
    from test_training import REPO, _env

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "layermoe/recipes/accelerate/cpu_ddp_2proc.yaml"), "--num_machines", "2", "--num_processes", "2",
           "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "-m", "layermoe", "-w", str(workdir), "train", "--stage", "1", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir.parent)


def _two_nodes(workdirs: tuple[Path, Path], *args: str, timeout: float = 300) -> list[tuple[int, str]]:
    from test_training import _free_port

    port = _free_port()
    nodes = [_launch_node(rank, workdir, port, *args) for rank, workdir in enumerate(workdirs)]
    done = []
    try:
        for node in nodes:
            _, err = node.communicate(timeout=timeout)
            done.append((node.returncode, err))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    return done


NODE_TRAIN = ["--max-steps", "4", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "2", "--report-to", "none"]


def test_two_nodes_without_a_shared_work_dir_stop_before_the_first_step_in_one_line(expanded, tmp_path):
    """Each node has its own copy of the work dir (no shared file system): both stop at launch with the
    same line, before step 1 (it crashed at the first checkpoint), and node 0's manifest is unchanged."""
    from layermoe.core.manifest import StepStatus
    from layermoe.core.workdir import Workdir

    workdirs = (tmp_path / "node0" / "run", tmp_path / "node1" / "run")
    for workdir in workdirs:
        workdir.parent.mkdir()
        shutil.copytree(expanded, workdir)
    results = _two_nodes(workdirs, *NODE_TRAIN, "--force")
    for rank, (code, err) in enumerate(results):
        assert code != 0, err[-3000:]
        ours = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1, err[-3000:]
        assert ours[0].startswith("error: the work dir is not shared by every node: rank 1 (host "), ours[0]
        assert "needs the work dir on a file system every node mounts at the same path" in ours[0]
        assert "stage training: step" not in err  # stopped before the first step
    for workdir in workdirs:
        assert not (workdir / "g1" / "stage1-run" / "checkpoints").exists()
        assert Workdir(workdir).load().generations[1].stage1.status == StepStatus.pending
        assert not list((workdir / "g1" / "stage1-run").glob(".shared-check-*"))


def test_two_nodes_on_one_shared_work_dir_train_and_force_means_the_same_on_both(expanded, tmp_path):
    from layermoe.core.manifest import StepStatus
    from layermoe.core.workdir import Workdir

    workdir = copy_of(expanded, tmp_path)
    results = _two_nodes((workdir, workdir), *NODE_TRAIN)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    record = Workdir(workdir).load().generations[1].stage1
    assert record.status == StepStatus.done and record.metrics["distributed"]["processes"] == 2
    assert [p.name for p in (workdir / "g1" / "stage1-run" / "checkpoints").iterdir()] == ["step-000002"]
    results = _two_nodes((workdir, workdir), *NODE_TRAIN, "--force")  # redone from scratch on both ranks
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    record = Workdir(workdir).load().generations[1].stage1
    assert record.status == StepStatus.done and record.metrics["resumed_from_step"] is None


# ---------------------------------------------------------------- point 6: --log-every


def test_log_every_is_a_flag_and_a_short_run_logs_every_step(expanded, tmp_path):
    workdir = copy_of(expanded, tmp_path)
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN, "--log-every", "1")
    assert result.exit_code == 0, result.output
    lines = (workdir / "g1" / "stage1-run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_a_stage_trained_again_logs_only_its_own_steps(expanded, tmp_path):
    """--force starts a new log: the earlier run's points are not left above the new ones."""
    workdir = copy_of(expanded, tmp_path)
    assert layermoe(workdir, "train", "--stage", "1", *TRAIN, "--log-every", "1").exit_code == 0
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN[:1], "3", *TRAIN[2:], "--log-every", "1", "--force")
    assert result.exit_code == 0, result.output
    lines = (workdir / "g1" / "stage1-run" / "train_log.jsonl").read_text().splitlines()
    assert [(json.loads(line)["step"], json.loads(line)["total_steps"]) for line in lines] == [(1, 3), (2, 3), (3, 3)]


def test_a_resumed_log_keeps_the_points_up_to_its_checkpoint_and_drops_a_cut_line(tmp_path):
    from layermoe.training.reporting import keep_log_up_to

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 8)) + '{"step": 8, "lo')
    keep_log_up_to(log, 6)  # killed at step 8 with its last checkpoint at step 6: steps 7 and 8 are logged again
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    keep_log_up_to(log, 0)
    assert log.read_text() == ""


def test_the_eval_tables_summary_is_one_line():
    from types import SimpleNamespace

    from rich.console import Console

    from layermoe.pipeline.evaluate import eval_table

    el = SimpleNamespace(bpb=1.2345, tokens=6147)
    record = SimpleNamespace(model="g1/stage1", languages={"el": el}, old_avg=6.0341, new_avg=1.2345,
                             metrics={"forgetting": 0.0012, "gain": -3.0})
    manifest = SimpleNamespace(generation_of_language=lambda: {"en": 0, "el": 1},
                               generations=[SimpleNamespace(eval=SimpleNamespace(languages={"el": el}))])
    console = Console(width=80, record=True)
    console.print(eval_table(manifest, SimpleNamespace(index=1), record))
    assert "Old-avg 6.0341 · New-avg 1.2345 · forgetting +0.0012 · gain -3.0000" in console.export_text()


def test_test_set_names_are_never_truncated_in_the_eval_table():
    from types import SimpleNamespace

    from rich.console import Console

    from layermoe.pipeline.evaluate import test_set_table

    name = "flores200-devtest-greek-news-and-wikipedia"
    result = SimpleNamespace(transfer=False, language="el", documents=1000, tokens=123456, bpb=1.2345)
    record = SimpleNamespace(model="g1/stage2", test_sets={name: result})
    manifest = SimpleNamespace(generation_of_language=lambda: {"el": 1},
                               generations=[SimpleNamespace(eval=SimpleNamespace(test_sets={name: result}))])
    console = Console(width=80, record=True)
    console.print(test_set_table(manifest, record))
    assert name in console.export_text()


# ---------------------------------------------------------------- point 2: the real mlflow and wandb

# CI's trackers leg installs mlflow and wandb and sets this: there a missing package fails instead of skipping.
TRACKERS_REQUIRED = os.environ.get("LAYERMOE_TRACKER_TESTS") == "1"


def tracker_package(name: str):
    if TRACKERS_REQUIRED:
        return __import__(name)
    return pytest.importorskip(name, reason=f"{name} is not in the lock: CI's trackers leg installs it")


LOSS_TERMS = ("loss", "ntp", "balance", "lr", "grad_norm", "tokens_seen")


def logged_points(workdir: Path) -> dict[int, dict]:
    lines = (workdir / "g1" / "stage1-run" / "train_log.jsonl").read_text().splitlines()
    return {point["step"]: point for point in map(json.loads, lines)}


@pytest.mark.trackers
def test_mlflow_records_every_loss_term_under_the_runs_logs_and_an_unusable_store_is_one_line_before_preparing(
        expanded, tmp_path, monkeypatch):
    tracker_package("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    workdir = copy_of(expanded, tmp_path)
    train = [a for a in TRAIN if a not in ("--report-to", "none")]
    (tmp_path / "a-file").write_text("not a directory")
    bad = f"sqlite:///{tmp_path}/a-file/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
    manifest = (workdir / "manifest.json").read_bytes()
    result = layermoe(workdir, "train", "--stage", "1", *train, "--report-to", "mlflow")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --report-to mlflow: the tracking store {bad} cannot be used")
    assert "prepare" not in result.stderr  # refused before the data is prepared (minutes at paper scale)
    assert (workdir / "manifest.json").read_bytes() == manifest
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    result = layermoe(workdir, "train", "--stage", "1", *train, "--report-to", "mlflow", "--log-every", "1")
    assert result.exit_code == 0, result.output
    store = workdir / "g1" / "stage1-run" / "logs" / "mlflow.db"
    assert store.is_file() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    points = logged_points(workdir)
    for term in LOSS_TERMS:
        history = client.get_metric_history(run.info.run_id, f"train/{term}")
        assert {m.step: m.value for m in history} == pytest.approx({s: p[term] for s, p in points.items()}), term


def wandb_history(run_file: Path) -> list[dict]:
    """The points of an offline wandb run, read from its .wandb file: a LevelDB-style log (32 KiB blocks of
    records, each a 7-byte header: crc, length, type) of protobuf Records, after a 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, points = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                points.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                               for item in record.history.item})
    return points


@pytest.mark.trackers
def test_wandb_offline_records_every_loss_term_under_the_runs_logs(expanded, tmp_path, monkeypatch):
    tracker_package("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    workdir = copy_of(expanded, tmp_path)
    train = [a for a in TRAIN if a not in ("--report-to", "none")]
    result = layermoe(workdir, "train", "--stage", "1", *train, "--report-to", "wandb", "--log-every", "1")
    assert result.exit_code == 0, result.output
    [run_file] = (workdir / "g1" / "stage1-run" / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    assert not (tmp_path / "wandb").exists()
    history = {point["_step"]: point for point in wandb_history(run_file)}
    points = logged_points(workdir)
    assert sorted(history) == sorted(points) == [1, 2]
    for step, point in points.items():
        for term in LOSS_TERMS:
            assert history[step][f"train/{term}"] == pytest.approx(point[term]), (step, term)


# ---------------------------------------------------------------- point 6: find_unused_parameters


@pytest.mark.parametrize(("stage", "dense", "expected"), [(1, False, True), (2, False, False), (1, True, False)])
def test_ddp_looks_for_unused_parameters_only_where_experts_train(monkeypatch, stage, dense, expected):
    """Top-k routing can leave a training expert without a token (stage 1 of a MoE model); stage 2's routers and
    classifiers see every token and a dense model uses every weight, so there DDP skips the extra autograd pass."""
    from test_distributed import accelerator_kwargs

    from layermoe.training import distributed
    from layermoe.training.config import TrainConfig

    seen = accelerator_kwargs(monkeypatch, TrainConfig(stage=stage, report_to="none"),
                              find_unused_parameters=distributed.parameters_may_go_unused(stage, dense))
    flags = [h.find_unused_parameters for h in seen["kwargs_handlers"] if hasattr(h, "find_unused_parameters")]
    assert flags == [expected]


def _launch_stage(tmp_path: Path, name: str, expanded: Path, stage: int, config_file: str, **config):
    from test_training import GENS, REPO, _corpus, _env, _free_port, _small_config

    train, _ = _corpus(40)
    args = tmp_path / f"{name}.json"
    args.write_text(json.dumps(dict(model_dir=str(expanded), output_dir=str(tmp_path / f"{name}_out"),
                                    work_dir=str(tmp_path / f"{name}_work"), texts_by_language=train,
                                    generation_of_language=GENS, current_generation=1,
                                    config=_small_config(stage, **config).model_dump(mode="json"))))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config_file),
           "--main_process_port", str(_free_port()), "-m", "layermoe.training.run_stage", "--args-json", str(args)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads((tmp_path / f"{name}_work" / "train_result.json").read_text())


def test_ddp_stage_2_has_no_unused_parameter_pass_and_21_experts_with_8_slots_still_train(tmp_path):
    """Stage 2 under DDP: no warning that find_unused_parameters found nothing (it was on everywhere). Stage 1 of a
    layer of 21 experts with 4 tokens x top-2 = 8 slots per rank per step (13 or more experts empty on every rank)
    trains without a hang under DDP, the ranks ending with the same weights."""
    from test_training import _expanded

    expanded = _expanded(tmp_path, new_experts=(20, 1))
    run, result = _launch_stage(tmp_path, "stage2", expanded, 2, "recipes/accelerate/cpu_ddp_2proc.yaml", max_steps=2,
                                micro_batch_size=2)
    assert "find_unused_parameters" not in run.stderr, run.stderr[-3000:]
    digests = result["trainable_checksum_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    run, result = _launch_stage(tmp_path, "empty", expanded, 1, "recipes/accelerate/cpu_ddp_2proc.yaml", max_steps=3,
                                micro_batch_size=1, seq_len=4)
    digests = result["trainable_checksum_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert result["tokens_seen"] == 3 * 2 * 4


@pytest.mark.slow
def test_fsdp2_trains_21_experts_with_8_slots_per_rank_without_a_hang(tmp_path):
    from test_training import _expanded

    expanded = _expanded(tmp_path, new_experts=(20, 1))
    _, result = _launch_stage(tmp_path, "fsdp", expanded, 1, "recipes/accelerate/cpu_fsdp2_2proc.yaml", max_steps=3,
                              micro_batch_size=1, seq_len=4)
    assert result["tokens_seen"] == 3 * 2 * 4


# ---------------------------------------------------------------- point 6: an extend that stops after its profile


@pytest.fixture(scope="module")
def trained(tmp_path_factory, expanded) -> Path:
    """G1 with stage 1 trained: what `extend` starts from."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(expanded, workdir)
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output
    return workdir


def test_an_extend_stopped_by_its_measured_similarities_keeps_the_profile_and_train_says_so(trained, tmp_path,
                                                                                              monkeypatch):
    """S^i <= 0 is known only once the profile measured it: extend then stops in one line (exit 2), keeps G2's
    profile (minutes on a real model) so that extend with another strategy starts at the allocation, and the next
    `train` says that G2 did not open instead of 'stage 1 of G1 is done already' with exit 0."""
    from layermoe.core.manifest import StepStatus
    from layermoe.core.workdir import Workdir
    from layermoe.pipeline import profile as profile_step

    workdir = copy_of(trained, tmp_path)
    real_scores, profiled = profile_step.layer_scores, []

    def negative_layer_1(*args):
        profiled.append(args)
        return [0.5, -0.25]

    monkeypatch.setattr(profile_step, "layer_scores", negative_layer_1)
    extend = ["extend", "--new", "hu", "--budget", "4", "--classifier-layers", "1", "--tokens", "400"]
    result = layermoe(workdir, *extend)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("error: layer 1 has similarity -0.25, but Eq. 10 needs every similarity > 0: profile with "
                         "more tokens or another model, or use the uniform strategy (G2's profile is kept: "
                         "`layermoe extend --new hu` with another --strategy starts at the allocation)"), lines[-1]
    generation = Workdir(workdir).load().generations[2]
    assert generation.profile.status == StepStatus.done and generation.allocation.status == StepStatus.failed
    assert (workdir / "g2" / "profile.json").is_file()

    result = layermoe(workdir, "status")
    assert result.exit_code == 0 and "✗ G2 allocation: layer 1 has similarity -0.25, but Eq. 10" in result.stdout
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: G2 (hu) did not open: `layermoe extend` stopped at its allocation (layer 1 has similarity -0.25, but "
        "Eq. 10 needs every similarity > 0: profile with more tokens or another model, or use the uniform strategy): "
        "run `layermoe extend --new hu` again")

    monkeypatch.setattr(profile_step, "layer_scores", real_scores)
    result = layermoe(workdir, *extend, "--strategy", "uniform")
    assert result.exit_code == 0, result.output
    assert len(profiled) == 1  # the kept profile, not measured again
    generation = Workdir(workdir).load().generations[2]
    assert generation.expansion.status == StepStatus.done and generation.profile.similarity == [0.5, -0.25]
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output


def test_an_extend_to_other_languages_replaces_a_generation_that_never_opened(trained, tmp_path, monkeypatch):
    from layermoe.core.workdir import Workdir
    from layermoe.pipeline import profile as profile_step

    workdir = copy_of(trained, tmp_path)
    real_scores = profile_step.layer_scores
    monkeypatch.setattr(profile_step, "layer_scores", lambda *args: [0.5, -0.25])
    extend = ["--budget", "4", "--classifier-layers", "1", "--tokens", "400"]
    assert layermoe(workdir, "extend", "--new", "hu", *extend).exit_code == 2
    monkeypatch.setattr(profile_step, "layer_scores", real_scores)
    result = layermoe(workdir, "extend", "--new", "tr", *extend)
    assert result.exit_code == 0, result.output
    assert "G2 (hu) never opened (its allocation failed): G2 is tr now" in " ".join(result.stderr.split())
    manifest = Workdir(workdir).load()
    assert [g.new_languages for g in manifest.generations] == [["en"], ["el"], ["tr"]]


def test_eval_generate_and_prepare_of_a_generation_that_never_opened_say_why(trained, tmp_path, monkeypatch):
    from layermoe.pipeline import profile as profile_step

    workdir = copy_of(trained, tmp_path)
    monkeypatch.setattr(profile_step, "layer_scores", lambda *args: [0.5, -0.25])
    assert layermoe(workdir, "extend", "--new", "hu", "--budget", "4", "--classifier-layers", "1",
                    "--tokens", "400").exit_code == 2
    for command in (["eval"], ["generate", "--prompt", "Hello"], ["prepare", "--stage", "1"]):
        result = layermoe(workdir, *command)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip().splitlines()[-1].startswith(
            "error: G2 (hu) did not open: `layermoe extend` stopped at its allocation (layer 1"), (command, result.stderr)
