"""Nothing lost: frozen-weight checksums and atomic, resumable training checkpoints.

A checkpoint is a directory `step-000123/` under `<work_dir>/checkpoints/`. It is written as
`.tmp-step-000123/`, every file fsynced, a `COMPLETE` marker written last, and only then
renamed into place (rename is atomic on POSIX). A crash at any moment leaves either the
previous checkpoints alone or a `.tmp-*` directory that is ignored and cleared on the next
save, so nothing that looks complete can be half-written.

Contents (single process / DDP): `trainable.safetensors` (the trainable weights only; the
frozen ones are checked by checksum instead), `optimizer.pt`, `scheduler.pt`,
`rng-rank<r>.pt` per process (python, numpy, torch CPU and CUDA), `state.json` (step, data
position, tokens seen, the config fingerprint). With FSDP / DeepSpeed the sharded model and
optimizer go through `accelerator.save_state`, which knows their layouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from layermoe.core.errors import LayermoeError
from layermoe.core.integrity import check_files, file_checksums
from layermoe.core.workdir import fsync_path
from layermoe.training.distributed import broadcast_from_main, is_sharded

COMPLETE = "COMPLETE"
_PREFIX = "step-"


class FrozenWeightsChanged(LayermoeError):
    """A tensor that training must not touch has changed."""


# ---------------------------------------------------------------- frozen checksums


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype and shape folded in, so a cast is a change too)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def value_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's values read as float32, and its shape: the same for a bf16 tensor and
    its exact fp32 copy, so a frozen weight that an engine keeps in another dtype is not "changed"."""
    t = tensor.detach()
    t = (t.cpu() if t.device.type != "cpu" else t).float().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_checksums(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """name -> value checksum (`value_sha256`) for every given tensor (the frozen parameters)."""
    return {name: value_sha256(t) for name, t in named_tensors}


def verify_frozen(named_tensors: Iterable[tuple[str, torch.Tensor]], expected: dict[str, str],
                  reference: Callable[[str], torch.Tensor] | None = None) -> None:
    """Raise FrozenWeightsChanged naming the tensors whose values differ from `expected`.

    A tensor held in a narrower dtype than its checksum was taken in (DeepSpeed keeps the
    whole module in bf16) is compared at its own precision instead: against
    `reference(name)`, the original values, rounded the same way.
    """
    seen = {}
    for name, t in named_tensors:
        if name not in expected:
            continue
        digest = value_sha256(t)
        if digest != expected[name] and reference is not None and t.dtype != torch.float32:
            base, _, rows = name.partition("[")  # "name[a:b]": frozen rows of a trainable tensor
            original = reference(base)
            if rows:
                start, end = (int(x) for x in rows.rstrip("]").split(":"))
                original = original[start:end]
            if value_sha256(original.to(t.dtype)) == digest:  # the same values, rounded: unchanged
                digest = expected[name]
        seen[name] = digest
    missing = sorted(set(expected) - set(seen))
    changed = sorted(n for n, h in seen.items() if h != expected[n])
    if changed or missing:
        names = changed + [f"{m} (missing)" for m in missing]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FrozenWeightsChanged(
            f"frozen weights changed during training: {shown}; the result was not saved, report this as a bug"
        )


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- directories


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (a directory without COMPLETE is ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and (p / COMPLETE).is_file():
            try:
                found.append((int(p.name[len(_PREFIX) :]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def staging_dir(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-{_PREFIX}{step:06d}"


def final_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:06d}"


def prepare_staging(root: Path, step: int) -> Path:
    """(main process) Clear stale temp dirs and create the staging dir for `step`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(f".tmp-{_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    stage = staging_dir(root, step)
    stage.mkdir()
    return stage


def _fsync_tree(directory: Path) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_path(directory)


def publish(root: Path, step: int, keep: int) -> Path:
    """(main process, after every rank wrote its files) fsync, mark COMPLETE, rename, prune."""
    stage = staging_dir(root, step)
    (stage / COMPLETE).write_text("ok\n")
    _fsync_tree(stage)
    target = final_dir(root, step)
    if target.exists():  # a complete checkpoint of the same step from an earlier attempt
        shutil.rmtree(target)
    os.replace(stage, target)
    fsync_path(Path(root))
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_files(stage_dir: Path) -> dict[str, dict]:
    """sha256 (and per-tensor digests) of every file of a checkpoint being written, for its state.json."""

    return file_checksums(stage_dir, exclude=("state.json", COMPLETE), recursive=True)


def verify_checkpoint_files(directory: Path, state: dict) -> None:
    """Refuse to resume from a checkpoint whose files changed since they were written (one line)."""

    check_files(directory, state.get("files") or {}, shown=str(directory), written_by="training (a resume checkpoint)",
                fix=f"delete {directory} to resume from an earlier checkpoint, or redo the stage with --force")


def verify_latest(root: Path) -> None:
    """Refuse now (one line) the checkpoint a resumed run would start from, if its files changed or its state is unreadable."""
    last = latest_checkpoint(root)
    if last is None:
        return
    try:
        state = read_json(last / "state.json")
    except (OSError, ValueError) as e:
        raise LayermoeError(f"{last / 'state.json'} cannot be read ({type(e).__name__}): delete {last} to resume from "
                            "an earlier checkpoint, or redo the stage with --force") from None
    verify_checkpoint_files(last, state)


def write_json(path: Path, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- a stage's resume points


class ResumePoints:
    """Save and resume one stage's training state (see the module docstring for the contents).

    Holds the live objects a checkpoint is made of; `fingerprint` is what a run that resumes
    must share with the run that saved (settings, data, frozen weights, process count).
    """

    def __init__(self, root: Path, accelerator, unwrapped, optimizer, scheduler, trainable_names: list[str],
                 fingerprint: dict, keep: int, blocks_per_step: int):
        self.root, self.accelerator, self.unwrapped = root, accelerator, unwrapped
        self.optimizer, self.scheduler, self.trainable_names = optimizer, scheduler, trainable_names
        self.fingerprint, self.keep, self.blocks_per_step = fingerprint, keep, blocks_per_step

    @property
    def _sharded(self) -> bool:
        return is_sharded(self.accelerator)

    def resume(self) -> tuple[int, int, int | None]:
        """(first step to run - 1, tokens seen, the step resumed from or None) from the newest checkpoint.

        Rank 0 picks it and every rank resumes from that one (a shared work dir: `check_shared_work_dir`)."""
        found = latest_checkpoint(self.root) if self.accelerator.is_main_process else None
        name = broadcast_from_main(self.accelerator, None if found is None else found.name)
        last = None if name is None else self.root / name
        if last is None:
            return 0, 0, None
        state = read_json(last / "state.json")
        if state["fingerprint"] != json.loads(json.dumps(self.fingerprint)):
            raise LayermoeError(
                f"{self.root} holds checkpoints of a different run (model, data, settings or process count differ); "
                "use a fresh work dir or delete that folder"
            )
        verify_checkpoint_files(last, state)
        if self._sharded:
            self.accelerator.load_state(str(last / "accelerate"))
        else:
            from safetensors.torch import load_file

            saved = load_file(str(last / "trainable.safetensors"))
            live = dict(self.unwrapped.named_parameters())
            with torch.no_grad():
                for name in self.trainable_names:
                    live[name].copy_(saved[name])
            self.optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=False))
        set_rng_state(torch.load(last / f"rng-rank{self.accelerator.process_index}.pt", weights_only=False))
        return state["step"], state["tokens_seen"], state["step"]

    def save(self, step: int, tokens_seen: int) -> None:
        """Write the checkpoint of `step` atomically (every rank its own files; the main one the rest)."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        if main:
            prepare_staging(self.root, step)
        accelerator.wait_for_everyone()
        stage_dir = staging_dir(self.root, step)
        if self._sharded:
            accelerator.save_state(str(stage_dir / "accelerate"))
        elif main:
            from safetensors.torch import save_file

            live = dict(self.unwrapped.named_parameters())
            save_file({n: live[n].detach().cpu().contiguous() for n in self.trainable_names},
                      str(stage_dir / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), stage_dir / "optimizer.pt")
        torch.save(rng_state(), stage_dir / f"rng-rank{accelerator.process_index}.pt")
        if main:
            torch.save(self.scheduler.state_dict(), stage_dir / "scheduler.pt")
        accelerator.wait_for_everyone()
        if main:  # every rank's files are written: record them, verified when a run resumes from here
            write_json(stage_dir / "state.json",
                       {"step": step, "position": step * self.blocks_per_step, "tokens_seen": tokens_seen,
                        "fingerprint": self.fingerprint, "files": checkpoint_files(stage_dir)})
            publish(self.root, step, self.keep)
        accelerator.wait_for_everyone()
