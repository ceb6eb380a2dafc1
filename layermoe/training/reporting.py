"""What a training stage tells people and tools: the JSONL log, the accelerate trackers
(`--report-to`), progress on the terminal or in a log file, and the routers' expert load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from rich.progress import MofNCompleteColumn, TextColumn

from layermoe.core.console import err_console
from layermoe.core.progress import Throttle, progress_bars
from layermoe.core.workdir import atomic_write_text


def keep_log_up_to(log_path: Path, step: int) -> None:
    """The log of a run that starts at `step`: a fresh run (0) starts an empty one; a resumed run keeps the points
    up to its checkpoint and drops what the interrupted run logged after it (it logs those steps again)."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: the run logs that step again
            continue
    atomic_write_text(log_path, "".join(f"{line}\n" for line in kept))


class StageReporter:
    """JSONL log + the accelerate trackers (`--report-to`) + progress, on the main process only.

    Progress: a Rich bar on a terminal; otherwise (SLURM, CI, a log file) a plain line every
    ~30 s and at the last step, since Rich would print its bar only once, at the end."""

    def __init__(self, log_path: Path, total_steps: int, start_step: int, show_progress: bool, accelerator,
                 run_config: dict, run_name: str):
        self.enabled = accelerator.is_main_process
        self.accelerator = accelerator
        self.file = None
        self.progress = None
        self.throttle = None
        self.total_steps, self.last = total_steps, None
        self.console = err_console
        self.trackers = bool(accelerator.log_with)
        if self.trackers:  # collective-free: only the main process holds trackers
            accelerator.init_trackers("layermoe", config=scalars(run_config), init_kwargs={
                "wandb": {"name": run_name, "dir": accelerator.logging_dir}, "mlflow": {"run_name": run_name}})
        if not self.enabled:
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        keep_log_up_to(log_path, start_step)
        self.file = open(log_path, "a", encoding="utf-8")
        if show_progress and not err_console.is_terminal:
            self.throttle = Throttle()
        elif show_progress:
            self.progress = progress_bars(err_console, MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                          elapsed=False)
            self.progress.start()
            self.task = self.progress.add_task("stage training", total=total_steps, completed=start_step, status="")

    def step(self, step: int, record: dict | None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            desc = ""
            if record:
                desc = f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=step, **({"status": desc} if desc else {}))
        self.last = record or self.last
        if self.throttle is not None and (self.throttle.due() or step == self.total_steps):
            line = f"stage training: step {step:,}/{self.total_steps:,}"
            if self.last:
                line += (f", loss {self.last['loss']:.4f} (step {self.last['step']:,}), "
                         f"{self.last['tokens_per_s']:,.0f} tok/s, {self.last['elapsed_s']:,.0f} s elapsed, "
                         f"about {self.last['eta_s']:,.0f} s to go")
            self.console.print(line, highlight=False, soft_wrap=True)
        if record is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers:
            self.accelerator.log(scalars(record, skip=("step",), prefix="train/"), step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.trackers and self.enabled:  # not end_training(): that also destroys the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()


def scalars(values: dict, skip=(), prefix: str = "") -> dict:
    """Flatten nested dicts/lists of numbers into `a/b/0`-named scalars (what trackers take)."""
    out = {}
    for key, value in values.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, prefix=f"{name}/"))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def expert_slot_counts(router_logits: Mapping[int, torch.Tensor], token_mask: torch.Tensor, top_k: int) -> dict[int, torch.Tensor]:
    """Per MoE layer, how many of the router's top-k slots each expert got ([E_i] counts), padding excluded."""
    counts = {}
    for layer, logits in router_logits.items():  # logits: [T, E_i]
        chosen = logits[token_mask].topk(min(top_k, logits.shape[-1]), dim=-1).indices  # [n, k]
        counts[layer] = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1])
    return counts


# ---------------------------------------------------------------- the stage


def load_fractions(accelerator, slots: dict[int, torch.Tensor]) -> dict[str, list[float]]:
    """Router top-k slot counts per layer, summed over processes, as fractions per expert."""
    layers = sorted(slots)
    flat = accelerator.reduce(torch.cat([slots[i].float() for i in layers]), reduction="sum")  # one collective
    out, start = {}, 0
    for layer in layers:
        counts = flat[start : start + slots[layer].numel()]
        start += slots[layer].numel()
        out[str(layer)] = [round(float(x), 6) for x in counts / counts.sum().clamp_min(1)]
    return out
