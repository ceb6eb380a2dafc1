"""Devices, processes and trackers for a training stage, all through `accelerate`.

The accelerate config (`accelerate launch --config_file ...`) decides the distributed type
and the device; this module only fills the gaps accelerate leaves:

- On a machine without CUDA, accelerate runs a multi-process launch as CPU processes over
  gloo, but only as DDP: it never routes a CPU run to FSDP, and a launch whose config says
  `use_cpu: false` comes up with every process alone (`DistributedType.NO`, rank 0 each).
  We pass `cpu=True` where no CUDA device exists, apply an FSDP2 config on the CPU too (the
  same `fully_shard` code path, over gloo: what CI tests), and refuse a multi-process launch
  that still ends up undistributed instead of letting its ranks train separately.
- DeepSpeed needs CUDA and, without a DataLoader, the micro-batch size in its config.
- Long work on one rank must not sit inside a collective call: the process-group timeout is
  a setting (`TrainConfig.process_group_timeout_minutes`), not NCCL's 10-minute default.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch

from layermoe.compat import mark_fsdp_on_cpu, reset_accelerate_state
from layermoe.core.errors import LayermoeError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The Python module each tracker needs, as accelerate imports it.
_TRACKER_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_world_size() -> int:
    """Processes started by `accelerate launch` / torchrun for this job (1 for a plain call)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_precision(precision: str) -> str:
    """"auto" -> bf16 on a GPU that supports it, else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _installed(tracker: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in _TRACKER_MODULES[tracker])


def resolve_trackers(report_to: str) -> list[str]:
    """`--report-to` -> accelerate tracker names. auto: tensorboard when installed, else none."""
    choice = report_to.strip().lower()
    if choice == "auto":
        return ["tensorboard"] if _installed("tensorboard") else []
    if choice == "none":
        return []
    wanted = list(TRACKERS) if choice == "all" else [t.strip() for t in choice.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TRACKERS]
    if unknown or not wanted:
        named = ", ".join(unknown) if unknown else repr(report_to)
        raise LayermoeError(f"unknown tracker {named} in --report-to: use {', '.join(TRACKERS)}, all, none or auto")
    missing = [t for t in wanted if not _installed(t)]
    if missing:
        raise LayermoeError(f"--report-to {','.join(missing)} needs the package{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}: pip install {' '.join(missing)} (or --report-to none)")
    return wanted


def check_launch_environment() -> None:
    """Refuse, before any process group exists, what cannot run here."""
    if _flag("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available():
        raise LayermoeError("the accelerate config asks for DeepSpeed, which needs CUDA GPUs, and none is visible: "
                            "use recipes/accelerate/fsdp2.yaml or cpu_ddp_2proc.yaml on this machine")
    if _flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise LayermoeError("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed")


def check_settings(config) -> None:
    """What `make_accelerator` would refuse, checked before any long work (prepare, loading)."""
    check_launch_environment()
    resolve_trackers(config.report_to)
    config.for_world_size(launched_world_size())  # a global batch that the processes cannot split


def parameters_may_go_unused(stage: int, dense: bool) -> bool:
    """Whether a step can leave a trainable parameter without a gradient, so DDP must look for such parameters
    (an extra pass over the autograd graph every step, and a warning on every rank when it finds none).

    Stage 1 of a MoE model: top-k routing can send no token of a micro-batch to an expert that trains.
    Stage 2 trains the routers and classifiers, which every token passes through; a dense model uses every weight.
    """
    return stage == 1 and not dense


def check_tracker_stores(config, run_dir: Path) -> None:
    """A tracker store that cannot be used, refused before any long work (data preparation, model loading), with
    the line `make_accelerator` would give; every rank runs it, so a refusal stops every rank alike."""
    if "mlflow" in resolve_trackers(config.report_to):
        use_mlflow_store(Path(run_dir) / "logs")


def make_accelerator(config, run_dir=None, find_unused_parameters: bool = True):
    """The Accelerator of a stage, as the launch's config says; see the module docstring.

    Trackers write under `<run_dir>/logs/` (tensorboard, mlflow; wandb's offline files too).
    `find_unused_parameters`: DDP's, from `parameters_may_go_unused` (on unless the caller knows better).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    check_launch_environment()
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[resolve_precision(config.precision)]
    handlers = [
        DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
        InitProcessGroupKwargs(timeout=timedelta(minutes=config.process_group_timeout_minutes)),
    ]
    trackers = resolve_trackers(config.report_to)
    if "mlflow" in trackers and run_dir is not None:
        use_mlflow_store(Path(run_dir) / "logs")
    # A recipe or `compare` trains several stages, of different precision, in one process.
    reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.grad_accum_steps,
        cpu=not torch.cuda.is_available(),  # no other device exists; the launch config decides the rest
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_config=None if run_dir is None else ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs")),
    )
    if _flag("ACCELERATE_USE_FSDP") and not torch.cuda.is_available():
        _fsdp_on_cpu(accelerator)
    if accelerator.is_fsdp2:
        _fp32_weights_under_fsdp2(accelerator.state.fsdp_plugin)
    check_distributed(accelerator.distributed_type, accelerator.num_processes, launched_world_size())
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # no DataLoader goes through prepare(): DeepSpeed needs the micro-batch size
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    return accelerator


def use_mlflow_store(logs_dir: Path) -> str:
    """The mlflow store of a run: MLFLOW_TRACKING_URI when set, else a sqlite file under the run's logs
    (mlflow 3's default is ./mlflow.db in the current directory). Refused in one line, before training,
    when it cannot be opened."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    given = bool(uri)
    if not given:
        logs_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(logs_dir / 'mlflow.db').absolute()}"
    mlflow.set_tracking_uri(uri)
    if given or int(os.environ.get("RANK", "0")) == 0:  # the default file: created by rank 0 alone
        try:
            mlflow.search_experiments(max_results=1)
        except Exception as e:  # any store error: an unusable store, one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise LayermoeError(f"--report-to mlflow: the tracking store {uri} cannot be used ({reason}): set "
                                "MLFLOW_TRACKING_URI to a working store, or unset it for a file under the run's logs"
                                ) from None
    return uri


def _fsdp_on_cpu(accelerator) -> None:
    """Apply the launch's FSDP config to a CPU run (accelerate itself runs CPU processes as DDP only)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the launch's environment
    if plugin.fsdp_version != 2:
        raise LayermoeError("FSDP on the CPU needs fsdp_version: 2 in the accelerate config (FSDP1 needs GPUs)")
    mark_fsdp_on_cpu(accelerator, plugin)


def _fp32_weights_under_fsdp2(plugin) -> None:
    """Gather and reduce in fp32 under FSDP2; accelerate's autocast still computes in bf16.

    accelerate's bf16 policy would all-gather every weight in bf16, so routers and classifiers
    would route from rounded weights and bf16 hidden states. Keeping them fp32 (as under DDP)
    keeps the top-k exact, at twice the all-gather bytes of a bf16 policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def check_distributed(distributed_type, num_processes: int, world_size: int) -> None:
    """A launch of several processes must give one process group of that size, never lone ranks."""
    if world_size > 1 and num_processes != world_size:
        raise LayermoeError(
            f"this process is one of {world_size} started by the launcher, but accelerate set it up as "
            f"{getattr(distributed_type, 'value', distributed_type)} with {num_processes} process(es): the ranks would "
            "train separately into one folder; check distributed_type and use_cpu in the accelerate config"
        )


def broadcast_from_main(accelerator, value):
    """The main process's `value` on every process (one small collective; none when alone)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


SHARED_CHECK_PREFIX = ".shared-check-"


def _look_for(token: Path, name: str, wait_s: float) -> bool:
    """Whether `token` holds `name`, looked for up to `wait_s` (a network file system's caches)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if token.read_text(encoding="utf-8") == name:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _write_token(directory: Path) -> tuple[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{SHARED_CHECK_PREFIX}{uuid.uuid4().hex}"
    token = directory / name
    with open(token, "w", encoding="utf-8") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    return name, token


def not_shared_error(views: list[tuple[int, str, bool]], directory: Path) -> LayermoeError | None:
    """The one line every rank stops with when some rank did not see rank 0's token; None when all did."""
    blind = [(rank, on) for rank, on, ok in views if not ok]
    if not blind:
        return None
    main_host = next(on for rank, on, _ in views if rank == 0)
    ranks = ", ".join(f"{rank} (host {on})" for rank, on in blind[:4]) + (" ..." if len(blind) > 4 else "")
    return LayermoeError(
        f"the work dir is not shared by every node: rank{'s' if len(blind) > 1 else ''} {ranks} cannot see the file "
        f"rank 0 (host {main_host}) wrote in {directory}; training on several nodes needs the work dir on a file "
        "system every node mounts at the same path (NFS, Lustre, ...): see README, \"Several nodes\"")


def check_shared_work_dir(accelerator, work_dir, wait_s: float = 10.0) -> None:
    """Several processes train into one work dir: every rank must see what rank 0 writes there.

    The contract of a launch on several nodes: the work dir is on a file system every node mounts
    at the same path (checkpoints, the trained model, the manifest are written once, by rank 0,
    and every rank reads them). Rank 0 writes a token of this launch; each rank looks for it (for up
    to `wait_s`, for a network file system's caches) and all of them stop with the same one line
    when one does not see it, before the first step, instead of failing at the first checkpoint."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    work_dir = Path(work_dir)
    name = token = None
    if accelerator.is_main_process:
        name, token = _write_token(work_dir)
    name = broadcast_from_main(accelerator, name)
    seen = _look_for(work_dir / name, name, wait_s)
    views = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    if token is not None:
        token.unlink(missing_ok=True)
    error = not_shared_error(views, work_dir)
    if error is not None:
        raise error


def check_shared_at_launch(directory, wait_s: float = 10.0, timeout_s: float = 1800.0) -> None:
    """`check_shared_work_dir` before any process group exists (a CLI step under `accelerate launch`),
    through the launcher's own key-value store: a rank of a node that does not share the work dir
    must not wait for files rank 0 writes elsewhere (the prepared data) while rank 0 waits for it.

    Needs torchrun's agent store (accelerate launch, torchrun); elsewhere it does nothing (the check
    after the process group starts still runs)."""
    world = launched_world_size()
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from torch.distributed import TCPStore

    rank = int(os.environ.get("RANK", "0"))
    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout,
                     wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"layermoe/shared-check/{attempt}"
    directory = Path(directory)
    token = None
    if rank == 0:
        name, token = _write_token(directory)
        store.set(f"{key}/token", name)
    name = store.get(f"{key}/token").decode()
    seen = _look_for(directory / name, name, wait_s)
    store.set(f"{key}/seen/{rank}", f"{int(seen)} {socket.gethostname()}")
    if rank == 0:
        store.wait([f"{key}/seen/{r}" for r in range(world)], timeout)
        views = []
        for r in range(world):
            ok, _, host = store.get(f"{key}/seen/{r}").decode().partition(" ")
            views.append((r, host, ok == "1"))
        token.unlink(missing_ok=True)
        error = not_shared_error(views, directory)
        store.set(f"{key}/verdict", "" if error is None else str(error))
    verdict = store.get(f"{key}/verdict").decode()
    if verdict:
        raise LayermoeError(verdict)


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
