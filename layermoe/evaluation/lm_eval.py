"""Run lm-evaluation-harness benchmarks on an in-memory model (optional extra `layermoe[eval]`).

The paper's benchmarks (ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot, Belebele
5-shot) are lm-eval tasks; this wraps the already-loaded model and tokenizer in lm-eval's
Hugging Face adapter (`HFLM`) and calls `lm_eval.simple_evaluate`, so no checkpoint is
reloaded. Task data comes from wherever the task says (usually the Hugging Face hub); a task
that cannot be reached is one clear LayermoeError, never a traceback. `check_tasks_load`
resolves the tasks and loads their data before any model is loaded (`eval` calls it first), and
`run_lm_eval` then runs the very task objects it built, so the data is read once.

lm-eval's notes about being handed an in-memory model (it is meant) and its `git describe` of
the current folder (`fatal: not a git repository`) are kept off the terminal during the call
(`quiet_lm_eval`); every other message of lm-eval still shows.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
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


# lm-eval's messages about what layermoe does on purpose: hand HFLM an in-memory model (of a model
# type transformers does not register, for an expanded model) and build a task from a local loader.
# A message is dropped when it holds one of these (long, exact phrases); by logger.
_NOISE = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "HF model type is neither marked as CausalLM or Seq2SeqLM",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


class _DropMessages(logging.Filter):
    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is lm-eval's to report, not ours to hide
            return True
        return not any(phrase in message for phrase in self.phrases)


def _no_git_hash():
    """In place of lm-eval's `get_git_commit_hash`, which runs `git describe` in the current folder
    and lets git print `fatal: not a git repository` there; layermoe keeps no git hash of lm-eval's."""


@contextmanager
def quiet_lm_eval():
    """lm-eval's noise (`_NOISE`, the git hash of the current folder) off the terminal for the
    duration of the block; lm-eval as it was afterwards."""
    filters = [(logging.getLogger(name), _DropMessages(phrases)) for name, phrases in _NOISE.items()]
    for logger, dropped in filters:
        logger.addFilter(dropped)
    try:
        from lm_eval import evaluator
    except ImportError:
        evaluator = None
    saved = getattr(evaluator, "get_git_commit_hash", None)
    if saved is not None:
        evaluator.get_git_commit_hash = _no_git_hash
    try:
        yield
    finally:
        if saved is not None:
            evaluator.get_git_commit_hash = saved
        for logger, dropped in filters:
            logger.removeFilter(dropped)


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class LoadedTasks:
    """lm-eval tasks resolved by name and their data loaded (`check_tasks_load`), ready to run."""

    names: list[str]  # as asked (a glob such as belebele_* is expanded in `objects`)
    task_manager: object  # lm-eval's TaskManager that resolved them
    objects: list = field(default_factory=list)  # what simple_evaluate's `tasks` gets: Task/Group objects (or names)


def _top_level(loaded: dict) -> list:
    """The items TaskManager.load built from one name: its groups that no other group holds and the
    tasks outside every group (a task, a group, or a tag's tasks)."""
    groups, tasks = loaded.get("groups") or {}, loaded.get("tasks") or {}
    children = {child for names in (loaded.get("group_map") or {}).values() for child in names}
    grouped = {task.task_name for group in groups.values() for task in group.get_all_tasks()}
    return ([group for name, group in groups.items() if name not in children]
            + [task for name, task in tasks.items() if name not in grouped])


def _build(task_manager, name: str) -> list:
    """The task objects of one name, their data loaded (what lm-eval does first in simple_evaluate)."""
    if hasattr(task_manager, "load"):  # lm-eval >= 0.4.11: {"tasks", "groups", "group_map"}
        return _top_level(task_manager.load([name]))
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    built = get_task_dict([name], task_manager)  # older: {name: Task} or {ConfigurableGroup: {...}}
    if all(isinstance(key, str) and isinstance(value, Task) for key, value in built.items()):
        return list(built.values())
    return [name]  # a group of the old kind: simple_evaluate builds it again (its data from the datasets cache)


def _task_manager(TaskManager, tasks: list[str], include_path: str | Path | None, include_defaults: bool):
    """lm-eval's task index. With --tasks-path holding every task asked, that folder alone (about 1 s
    instead of indexing lm-eval's ~10k built-in tasks, about 15 s)."""
    folder = str(include_path) if include_path is not None else None
    if folder is not None and include_defaults:
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return TaskManager(include_path=folder, include_defaults=include_defaults)


def check_tasks_load(
    tasks: list[str], include_path: str | Path | None = None, include_defaults: bool = True
) -> LoadedTasks:
    """Resolve `tasks` and load every task's data, before any model is loaded: an unknown name, a
    task that cannot be built or data that cannot be reached (not cached, no network) is one
    LayermoeError naming the task. The result goes to `run_lm_eval(..., loaded=)`, which runs these
    objects, so the data is read once. A name may be a glob (`belebele_*`), as in lm-eval's CLI."""
    if not tasks:
        raise LayermoeError("no lm-eval task given: name at least one, e.g. arc_challenge")
    _, _, TaskManager = _import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise LayermoeError(f"lm-eval include path {include_path} is not a folder of task YAML files")
    with quiet_lm_eval():
        task_manager = _task_manager(TaskManager, list(tasks), include_path, include_defaults)
        unknown = [t for t in tasks if not task_manager.match_tasks([t])]
        if unknown:
            raise LayermoeError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm-eval ls tasks`, "
                                "or pass a folder of task YAMLs with --tasks-path)")
        known = set(task_manager.all_tasks)
        names = [n for t in tasks for n in ([t] if t in known else task_manager.match_tasks([t]))]
        objects = []
        for name in dict.fromkeys(names):
            try:
                objects.extend(_build(task_manager, name))
            except (ConnectionError, OSError) as e:
                # datasets raises these (or subclasses) when a task's data is neither cached nor reachable
                raise LayermoeError(f"the data of lm-eval task {name} could not be loaded ({_first_line(e)}): check the "
                                    "network or the datasets cache (HF_DATASETS_OFFLINE=1 allows cached data only)"
                                    ) from None
            except Exception as e:  # noqa: BLE001 - a task definition lm-eval cannot build: its message, on one line
                raise LayermoeError(f"lm-eval task {name} could not be built ({type(e).__name__}: {_first_line(e)})"
                                    ) from None
    return LoadedTasks(list(tasks), task_manager, objects)


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
    loaded: LoadedTasks | None = None,
) -> dict:
    """Score `model` on lm-eval `tasks`; returns plain dicts.

    {"lm_eval_version", "tasks", "num_fewshot", "limit",
     "results": {task: {metric: value}}  (keys as lm-eval names them, e.g. "acc,none", "acc_stderr,none"),
     "n_samples": {task: {"original", "effective"}},
     "samples": {task: [per-document records]}  (only with return_samples)}

    `batch_size`: an integer, `auto` or `auto:N` (`parse_batch_size`); the model runs in the
    dtype it was loaded in (`eval` loads bfloat16 on CUDA, float32 on CPU).
    `include_path` is a folder of extra task YAMLs (e.g. local data sets);
    `include_defaults=False` skips indexing lm-eval's ~10k built-in tasks (about 15 s).
    `loaded`: what `check_tasks_load` built for these tasks (else they are resolved and loaded here).
    Standard errors: closed form for a mean (acc, acc_norm), else bootstrapped (1,000 draws).
    """
    if not tasks:
        raise LayermoeError("no lm-eval task given: name at least one, e.g. arc_challenge")
    lm_eval, HFLM, _ = _import_lm_eval()
    if loaded is None:
        loaded = check_tasks_load(tasks, include_path=include_path, include_defaults=include_defaults)
    was_training = model.training
    model.eval()
    try:
        with quiet_lm_eval():
            wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=parse_batch_size(batch_size))
            output = lm_eval.simple_evaluate(
                model=wrapped,
                tasks=list(loaded.objects),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=loaded.task_manager,
                log_samples=return_samples,
                bootstrap_iters=1000,
            )
    except (ConnectionError, OSError) as e:
        # datasets raises these (or subclasses) when a task's data is neither cached nor reachable.
        raise LayermoeError(f"the data of lm-eval task(s) {', '.join(tasks)} could not be loaded ({_first_line(e)}): "
                            "check the network or the datasets cache")
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


# ---------------------------------------------------------------------------- one record, several runs


def _settings(record: dict) -> dict:
    return {"num_fewshot": record.get("num_fewshot"), "limit": record.get("limit"),
            "lm_eval_version": record.get("lm_eval_version")}


def runs_of(record: dict) -> list[dict]:
    """The runs whose scores all still stand in `record`: {"tasks" (as asked), "num_fewshot", "limit", "results"
    (the result keys it gave)}. A record written before runs were kept is one run, of its top-level settings."""
    if "runs" in record:
        return record["runs"]
    if not record.get("tasks"):
        return []
    return [{"tasks": list(record["tasks"]), "num_fewshot": record.get("num_fewshot"), "limit": record.get("limit"),
             "results": list(record.get("results", {}))}]


def settings_of(record: dict, key: str) -> dict:
    """The few-shot count, limit and lm-eval version result `key` of `record` was scored with."""
    return (record.get("settings") or {}).get(key) or _settings(record)


def scores_known(record: dict, tasks: list[str], num_fewshot: int | None, limit: int | float | None) -> bool:
    """True when every task asked is one a standing run of `record` scored with these settings."""
    runs = runs_of(record)
    return all(any(task in run["tasks"] and run["num_fewshot"] == num_fewshot and run["limit"] == limit for run in runs)
               for task in tasks)


def merge_benchmark_runs(earlier: dict | None, latest: dict) -> dict:
    """One model's lm-eval record over every `eval --tasks` run: the latest run's results over the earlier ones'.

    The papers score each benchmark with its own shot count, so a user runs one `eval --tasks` per benchmark:
    each keeps the others' scores. Every result key records the settings it was scored with (`settings`). An
    earlier run that shares a task name or a result key with the latest one no longer stands (`runs`): its other
    scores stay, but asking it again runs it again. The top-level keys are the latest run's.
    """
    earlier = earlier or {}
    latest_keys = list(latest.get("results", {}))
    standing = [run for run in runs_of(earlier)
                if not set(run["results"]) & set(latest_keys) and not set(run["tasks"]) & set(latest["tasks"])]
    merged = dict(latest)
    merged["results"] = {**earlier.get("results", {}), **latest.get("results", {})}
    merged["n_samples"] = {**earlier.get("n_samples", {}), **latest.get("n_samples", {})}
    merged["settings"] = {**{key: settings_of(earlier, key) for key in earlier.get("results", {})},
                          **{key: _settings(latest) for key in latest_keys}}
    merged["runs"] = standing + [{"tasks": list(latest["tasks"]), "num_fewshot": latest.get("num_fewshot"),
                                  "limit": latest.get("limit"), "results": latest_keys}]
    return merged
