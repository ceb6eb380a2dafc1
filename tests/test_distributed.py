"""Training on real setups, checked on the CPU: FSDP2 over two gloo processes (sharded, equal
to one process, exact after SIGKILL + resume), launches that must be refused, the shipped
accelerate configs, dtype-independent frozen checks, trackers and what they log."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from test_training import GENS, REPO, _corpus, _env, _expanded, _free_port, _small_config, _weights
from typer.testing import CliRunner

from layermoe.core.errors import LayermoeError
from layermoe.training import distributed
from layermoe.training.checkpoint import FrozenWeightsChanged, frozen_checksums, latest_checkpoint, verify_frozen
from layermoe.training.config import TrainConfig
from layermoe.training.loop import train_stage

_LAUNCHED_RUN = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from layermoe.training.config import TrainConfig
from layermoe.training.loop import train_stage
a = json.loads(Path(sys.argv[1]).read_text())
kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
def on_step(record):  # the main process only
    if record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
r = train_stage(a["model_dir"], a["output_dir"], a["texts"], a["gens"], 1, TrainConfig(**a["config"]), a["work_dir"],
                on_step=on_step)
if int(os.environ.get("RANK", "0")) == 0:
    Path(a["result"]).write_text(json.dumps(r.to_dict()))
"""


def _launch(tmp_path: Path, name: str, model_dir: Path, config: TrainConfig, texts, kill_at: int = 0):
    script = tmp_path / "launched_run.py"
    script.write_text(_LAUNCHED_RUN)
    args = tmp_path / f"{name}.json"
    args.write_text(json.dumps(dict(model_dir=str(model_dir), output_dir=str(tmp_path / f"{name}_out"), texts=texts,
                                    gens=GENS, config=config.model_dump(mode="json"), work_dir=str(tmp_path / f"{name}_work"),
                                    result=str(tmp_path / f"{name}_result.json"))))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu_fsdp2_2proc.yaml"), "--main_process_port", str(_free_port()),
           str(script), str(args)]
    return subprocess.run(cmd, env={**_env(), "KILL_AT_STEP": str(kill_at)}, capture_output=True, text=True, cwd=tmp_path)


def _assert_same_weights(got: Path, want: Path) -> None:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_fsdp2_on_two_cpu_processes_is_sharded_exact_and_resumes(tmp_path):
    expanded = _expanded(tmp_path)
    train, _ = _corpus(40)
    # Same global batch (4 blocks per optimizer step) and the same micro-batch split: two ranks
    # of 2 blocks, or one process accumulating two micro-batches of 2.
    fsdp = {1: _small_config(1, max_steps=6, micro_batch_size=2, checkpoint_every=2, warmup_steps=1),
            2: _small_config(2, max_steps=4, micro_batch_size=2, checkpoint_every=0, docs_per_new_language=40)}
    single = {stage: c.model_copy(update={"grad_accum_steps": 2}) for stage, c in fsdp.items()}

    crashed = _launch(tmp_path, "s1", expanded, fsdp[1], train, kill_at=5)
    assert crashed.returncode != 0
    assert latest_checkpoint(tmp_path / "s1_work" / "checkpoints").name == "step-000004"
    assert not (tmp_path / "s1_out").exists()
    resumed = _launch(tmp_path, "s1", expanded, fsdp[1], train)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((tmp_path / "s1_result.json").read_text())
    assert result["resumed_from_step"] == 4
    assert result["distributed"]["type"] == "FSDP" and result["distributed"]["processes"] == 2
    assert result["distributed"]["sharded_parameters"] == len(_weights(expanded))  # every parameter a DTensor

    reference = train_stage(expanded, tmp_path / "ref1", train, GENS, 1, single[1], tmp_path / "ref1_work")
    assert result["tokens_seen"] == reference.tokens_seen
    _assert_same_weights(tmp_path / "s1_out", tmp_path / "ref1")
    before, after = _weights(expanded), _weights(tmp_path / "s1_out")
    frozen = [n for n in before if ".experts.g1." not in n and ".router." not in n]
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # and they were verified in the run
    assert any(not torch.equal(before[n], after[n]) for n in before if ".experts.g1." in n)

    stage2 = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/cpu_fsdp2_2proc.yaml"),
         "--main_process_port", str(_free_port()), str(tmp_path / "launched_run.py"), str(_stage2_args(tmp_path, fsdp[2], train))],
        env=_env(), capture_output=True, text=True, cwd=tmp_path)
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    train_stage(tmp_path / "ref1", tmp_path / "ref2", train, GENS, 1, single[2], tmp_path / "ref2_work")
    _assert_same_weights(tmp_path / "s2_out", tmp_path / "ref2")


def _stage2_args(tmp_path: Path, config: TrainConfig, texts) -> Path:
    args = tmp_path / "s2.json"
    args.write_text(json.dumps(dict(model_dir=str(tmp_path / "s1_out"), output_dir=str(tmp_path / "s2_out"), texts=texts,
                                    gens=GENS, config=config.model_dump(mode="json"), work_dir=str(tmp_path / "s2_work"),
                                    result=str(tmp_path / "s2_result.json"))))
    return args


# ---------------------------------------------------------------- launches refused


def test_a_launch_of_several_processes_that_ends_up_undistributed_is_refused():
    from accelerate.utils import DistributedType

    with pytest.raises(LayermoeError) as refused:
        distributed.check_distributed(DistributedType.NO, 1, 2)
    assert str(refused.value) == (
        "this process is one of 2 started by the launcher, but accelerate set it up as NO with 1 process(es): "
        "the ranks would train separately into one folder; check distributed_type and use_cpu in the accelerate config")
    distributed.check_distributed(DistributedType.MULTI_CPU, 2, 2)
    distributed.check_distributed(DistributedType.NO, 1, 1)


@pytest.fixture(scope="module")
def expanded_workdir(tmp_path_factory):
    from layermoe.cli import app
    from layermoe.testing import make_tiny_model

    root = tmp_path_factory.mktemp("dist")
    tiny = make_tiny_model(root / "tiny", "llama", num_layers=2, shared_direction=0.05)
    workdir = root / "run"
    runner = CliRunner()
    for args in (["profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "400"],
                 ["allocate", "--budget", "4", "--classifier-layers", "1"], ["expand"]):
        result = runner.invoke(app, ["-w", str(workdir), *args])
        assert result.exit_code == 0, result.output
    return workdir


def _train(workdir: Path, *args: str, env: dict | None = None):
    from layermoe.cli import app

    return CliRunner().invoke(app, ["-w", str(workdir), "train", "--stage", "1", "--max-steps", "2", "--seq-len", "32",
                                    "--micro-batch", "2", *args], env={"COLUMNS": "200", **(env or {})})


def _manifest_bytes(workdir: Path) -> bytes:
    return (workdir / "manifest.json").read_bytes()


def test_deepspeed_without_cuda_is_one_line(expanded_workdir, monkeypatch):
    before = _manifest_bytes(expanded_workdir)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    result = _train(expanded_workdir)
    assert result.exit_code == 2
    assert result.stderr == ("error: the accelerate config asks for DeepSpeed, which needs CUDA GPUs, and none is visible: "
                             "use recipes/accelerate/fsdp2.yaml or cpu_ddp_2proc.yaml on this machine\n")
    assert _manifest_bytes(expanded_workdir) == before


@pytest.mark.parametrize("report_to,message", [
    ("bogus", "error: unknown tracker bogus in --report-to: use tensorboard, wandb, mlflow, all, none or auto\n"),
    ("wandb,mlflow", "error: --report-to wandb,mlflow needs the packages wandb, mlflow: pip install wandb mlflow "
                     "(or --report-to none)\n"),
])
def test_bad_trackers_are_one_line(expanded_workdir, report_to, message, monkeypatch):
    monkeypatch.setattr(distributed, "_installed", lambda tracker: tracker == "tensorboard")
    before = _manifest_bytes(expanded_workdir)
    result = _train(expanded_workdir, "--report-to", report_to)
    assert result.exit_code == 2
    assert result.stderr == message
    assert _manifest_bytes(expanded_workdir) == before


def test_shipped_accelerate_configs_parse_as_what_they_say():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))}
    assert set(configs) == {"cpu_ddp_2proc", "cpu_fsdp2_2proc", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2",
                            "single_gpu"}
    assert configs["fsdp2"].distributed_type.value == "FSDP" and configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp2"].fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert configs["cpu_fsdp2_2proc"].fsdp_config["fsdp_version"] == 2 and configs["cpu_fsdp2_2proc"].num_processes == 2
    for stage in (2, 3):
        ds = configs[f"deepspeed_zero{stage}"]
        assert ds.distributed_type.value == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == stage
    assert configs["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"


def accelerator_kwargs(monkeypatch, config: TrainConfig, **kwargs) -> dict:
    """What `make_accelerator(config, **kwargs)` hands accelerate's Accelerator (stopped there)."""
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("stop here")

    monkeypatch.setattr("accelerate.Accelerator", Recorder)
    with pytest.raises(RuntimeError, match="stop here"):
        distributed.make_accelerator(config, **kwargs)
    return seen


def test_make_accelerator_sets_the_process_group_timeout_and_trackers(monkeypatch):
    monkeypatch.setattr(distributed, "_installed", lambda tracker: True)
    seen = accelerator_kwargs(monkeypatch, TrainConfig(stage=1, process_group_timeout_minutes=90, report_to="all"))
    timeouts = [h.timeout for h in seen["kwargs_handlers"] if hasattr(h, "timeout")]
    assert timeouts == [timedelta(minutes=90)]
    assert seen["log_with"] == ["tensorboard", "wandb", "mlflow"]


def test_stages_of_different_precisions_in_one_process():
    """`layermoe run`, `compare` and a notebook train several stages in one process; each gets what it asks for
    (accelerate keeps its state in a process-wide singleton that refuses a second precision)."""
    first = distributed.make_accelerator(TrainConfig(stage=1, precision="bf16", grad_accum_steps=2, report_to="none"))
    assert (first.mixed_precision, first.gradient_accumulation_steps) == ("bf16", 2)
    second = distributed.make_accelerator(TrainConfig(stage=2, precision="fp32", grad_accum_steps=1, report_to="none"))
    assert (second.mixed_precision, second.gradient_accumulation_steps) == ("no", 1)
    assert second.num_processes == 1 and second.distributed_type.value == "NO"


# ---------------------------------------------------------------- frozen checks across dtypes


def test_frozen_check_compares_values_whatever_the_dtype():
    original = {"a": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                "b": torch.randn(5, generator=torch.Generator().manual_seed(1)).bfloat16().float()}
    expected = frozen_checksums(original.items())
    # an exact bf16 copy of bf16-representable values: the same values
    verify_frozen([("a", original["a"]), ("b", original["b"].bfloat16())], expected)
    # an engine that rounded fp32 weights to bf16 (DeepSpeed): equal at bf16 precision
    rounded = [("a", original["a"].bfloat16()), ("b", original["b"])]
    with pytest.raises(FrozenWeightsChanged, match=r"^frozen weights changed during training: a;"):
        verify_frozen(rounded, expected)
    verify_frozen(rounded, expected, reference=original.__getitem__)
    moved = original["a"].clone()
    moved[1, 2] += 0.25
    with pytest.raises(FrozenWeightsChanged, match=r"^frozen weights changed during training: a;"):
        verify_frozen([("a", moved.bfloat16()), ("b", original["b"])], expected, reference=original.__getitem__)


def test_the_saved_model_is_built_around_the_gathered_state_without_a_copy(tmp_path):
    from layermoe.modeling import load_layermoe
    from layermoe.training.saving import checkpoint_tensors as _checkpoint_tensors
    from layermoe.training.saving import model_from_state_dict as _model_from_state_dict

    expanded = _expanded(tmp_path)
    model = load_layermoe(expanded)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    router = next(n for n in state if ".router." in n)
    state[router] += 1.0  # trained
    frozen_name = next(n for n in state if ".expert0." in n)
    state[frozen_name] = state[frozen_name].bfloat16().float()  # as an engine that rounded it
    rebuilt = _model_from_state_dict(expanded, False, state, torch.float32, frozen={frozen_name},
                                     reference=_checkpoint_tensors(expanded))
    got = dict(rebuilt.named_parameters())
    assert got[router].data_ptr() == state[router].data_ptr()  # assigned, not copied
    assert torch.equal(got[router], state[router])
    assert torch.equal(got[frozen_name], model.state_dict()[frozen_name])  # the original, not the rounded one


# ---------------------------------------------------------------- what a run logs


def test_the_log_has_grad_norm_learning_rate_and_expert_load(tmp_path):
    expanded = _expanded(tmp_path)
    train, _ = _corpus(30)
    config = _small_config(1, max_steps=4, log_every=2, report_to="none")
    train_stage(expanded, tmp_path / "out", train, GENS, 1, config, tmp_path / "work")
    records = [json.loads(line) for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["lr"] > records[1]["lr"] == 0.0  # cosine to zero at the last step
    for record in records:
        assert record["grad_norm"] > 0 and {"ntp", "balance", "loss", "tokens_per_s"} <= set(record)
        loads = record["expert_load"]
        assert set(loads) == {"0", "1"}  # the two MoE layers: 3 and 2 experts
        assert [len(loads["0"]), len(loads["1"])] == [3, 2]
        for fractions in loads.values():
            assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
    assert not (tmp_path / "work" / "logs").exists()


def test_tensorboard_gets_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expanded = _expanded(tmp_path)
    train, _ = _corpus(30)
    train_stage(expanded, tmp_path / "out", train, GENS, 1, _small_config(1, max_steps=2, log_every=1, report_to="tensorboard"),
                tmp_path / "work")
    runs = list((tmp_path / "work" / "logs").rglob("events.out.tfevents.*"))
    assert runs
    events = EventAccumulator(str(runs[0].parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ntp", "train/balance", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/expert_load/0/0", "train/expert_load/1/1"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
