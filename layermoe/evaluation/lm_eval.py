"""Run lm-evaluation-harness benchmarks on an in-memory model (optional extra `layermoe[eval]`).

The paper's benchmarks (ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot, Belebele
5-shot) are lm-eval tasks; this wraps the already-loaded model and tokenizer in lm-eval's
Hugging Face adapter (`HFLM`) and calls `lm_eval.simple_evaluate`, so no checkpoint is
reloaded. Task data comes from wherever the task says (usually the Hugging Face hub); a task
that cannot be reached is one clear LayermoeError, never a traceback.
"""

from __future__ import annotations

import math
from pathlib import Path

from layermoe.core.errors import LayermoeError

INSTALL_HINT = "pip install 'layermoe[eval]'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LayermoeError(f"benchmarks need lm-evaluation-harness, which is not installed ({e.name or e}): {INSTALL_HINT}")
    return lm_eval, HFLM, TaskManager


def parse_batch_size(value: int | str) -> int | str:
    """lm-eval's batch size from a CLI value: a positive integer, `auto` (lm-eval finds the largest
    that fits, from 64 down) or `auto:N` (that search again N times as the documents get shorter)."""
    text = str(value).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    raise LayermoeError(f"--batch-size {value}: use a positive integer, auto or auto:N")


def _plain(value):
    """JSON-safe scalars: NaN/inf become None (lm-eval reports N/A stderr as NaN or 'N/A')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    batch_size: int | str = 1,
    return_samples: bool = False,
    include_defaults: bool = True,
) -> dict:
    """Score `model` on lm-eval `tasks`; returns plain dicts.

    {"lm_eval_version", "tasks", "num_fewshot", "limit",
     "results": {task: {metric: value}}  (keys as lm-eval names them, e.g. "acc,none"),
     "n_samples": {task: {"original", "effective"}},
     "samples": {task: [per-document records]}  (only with return_samples)}

    `batch_size`: an integer, `auto` or `auto:N` (`parse_batch_size`); the model runs in the
    dtype it was loaded in (`eval` loads bfloat16 on CUDA, float32 on CPU).
    `include_path` is a folder of extra task YAMLs (e.g. local data sets);
    `include_defaults=False` skips indexing lm-eval's ~10k built-in tasks (about 15 s).
    """
    if not tasks:
        raise LayermoeError("no lm-eval task given: name at least one, e.g. arc_challenge")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise LayermoeError(f"lm-eval include path {include_path} is not a folder of task YAML files")
    task_manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None, include_defaults=include_defaults
    )
    unknown = [t for t in tasks if not task_manager.match_tasks([t])]
    if unknown:
        raise LayermoeError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm-eval ls tasks`, or pass a folder of task YAMLs)")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=parse_batch_size(batch_size))
    was_training = model.training
    model.eval()
    try:
        output = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=return_samples,
            bootstrap_iters=0,
        )
    except (ConnectionError, OSError) as e:
        # datasets raises these (or subclasses) when a task's data is neither cached nor reachable.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayermoeError(f"the data of lm-eval task(s) {', '.join(tasks)} could not be loaded ({first_line}): check the network or the datasets cache")
    finally:
        model.train(was_training)
    if output is None:  # lm-eval returns None on non-zero ranks of a distributed run
        return {}
    version = getattr(lm_eval, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("lm_eval")
    result = {
        "lm_eval_version": version,
        "tasks": list(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "results": {
            task: {metric: _plain(value) for metric, value in metrics.items() if metric != "alias"}
            for task, metrics in output.get("results", {}).items()
        },
        "n_samples": output.get("n-samples", {}),
    }
    if return_samples:
        result["samples"] = output.get("samples", {})
    return result
