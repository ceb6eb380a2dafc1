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


def make_accelerator(config, run_dir=None):
    """The Accelerator of a stage, as the launch's config says; see the module docstring.

    Trackers write under `<run_dir>/logs/` (tensorboard, mlflow; wandb's offline files too).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    check_launch_environment()
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[resolve_precision(config.precision)]
    handlers = [
        # Top-k routing leaves some experts without tokens in a micro-batch: DDP must allow unused params.
        DistributedDataParallelKwargs(find_unused_parameters=True),
        InitProcessGroupKwargs(timeout=timedelta(minutes=config.process_group_timeout_minutes)),
    ]
    trackers = resolve_trackers(config.report_to)
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


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
