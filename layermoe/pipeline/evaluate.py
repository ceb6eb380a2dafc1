"""`layermoe eval`: bits per byte per language (held-out split and the user's own test sets),
old vs new, routing health, lm-eval, report.

Every figure goes through the eval cache (`eval_cache.py`): a model is measured once per
language, texts and settings. The base model's figures are cached in G0's eval record.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from layermoe.core.console import console, err_console
from layermoe.core.devices import dtype_name, resolve_device, resolve_dtype, torch_dtype
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import EvalRecord, Generation, LanguageEval, Manifest, NamedTestSet, StepStatus
from layermoe.core.numbers import signed
from layermoe.core.progress import token_progress
from layermoe.core.workdir import Workdir, run_step, session
from layermoe.data import describe_source, load_documents, parse_data_args
from layermoe.evaluation import forgetting_and_gain, group_averages, summarise_routing
from layermoe.evaluation.lm_eval import (
    LoadedTasks,
    check_tasks_load,
    merge_benchmark_runs,
    parse_batch_size,
    run_lm_eval,
    scores_known,
    settings_of,
)
from layermoe.evaluation.report import render_report
from layermoe.modeling.base import ModelSource
from layermoe.pipeline.common import (
    base_source,
    documents_for_tokens,
    latest_checkpoint,
    load_base,
    load_checkpoint,
    require_open,
    texts_for,
    verify_checkpoint,
)
from layermoe.pipeline.eval_cache import EvalCache, EvalJob, Measured, ModelUnderTest, from_cache, measure_cached
from layermoe.pipeline.options import EvalOptions


def run_eval(workdir: Workdir, options: EvalOptions) -> None:
    """`layermoe eval`: measure the current generation's model (or the one --model names)."""
    with session(workdir):
        manifest = workdir.load()
        evaluate_generation(workdir, manifest, manifest.current, options)


# ---------------------------------------------------------------------------- what to measure


def _data_home(manifest: Manifest, language: str) -> Generation:
    """The newest generation whose data record covers `language` (every generation lists all its languages)."""
    for generation in reversed(manifest.generations):
        if language in generation.data:
            return generation
    raise LayermoeError(f"no data recorded for {language}: run `layermoe profile` first")


def held_out_texts(workdir: Workdir, manifest: Manifest, languages: list[str], max_tokens: int | None) -> dict[str, list[str]]:
    texts = {}
    for language in languages:
        texts[language] = texts_for(workdir, _data_home(manifest, language), language, "heldout",
                                    limit=documents_for_tokens(max_tokens))
        if not texts[language]:
            raise LayermoeError(f"the held-out split of {language} is empty: give it more documents with --data")
    return texts


@dataclass
class TestSet:
    """`eval --data LANG=SPEC`: a language's own test texts, evaluated in full."""

    name: str  # "LANG=SPEC", SPEC as stored (a path relative to the work dir)
    language: str
    source: str
    kind: str
    sha256: str | None
    texts: list[str]


def load_test_sets(workdir: Workdir, data: list[str], text_field: str = "text") -> list[TestSet]:
    """Parse and read every --data LANG=SPEC (any SPEC `profile` takes); bad input is one clear error."""

    test_sets = []
    for language, spec in parse_data_args(list(data)).items():
        info = describe_source(language, spec, text_field=text_field)
        texts = list(load_documents(language, spec, split="all", cache_dir=workdir.cache_dir / "datasets",
                                    text_field=text_field))
        stored = spec if info["kind"] in ("builtin", "hf") else workdir.rel(spec)
        test_sets.append(TestSet(f"{language}={stored}", language, stored, info["kind"], info.get("sha256"), texts))
    return test_sets


def base_under_test(workdir: Workdir, manifest: Manifest, dtype: str = "float32") -> ModelUnderTest:
    """The base model, loaded in `dtype` (a name: float32, bfloat16) when first needed."""
    return ModelUnderTest("base", base_source(workdir, manifest),
                          lambda device: load_base(workdir, manifest, device=device, dtype=torch_dtype(dtype)),
                          workdir.cache_dir / "models", dtype=dtype)


def checkpoint_under_test(workdir: Workdir, manifest: Manifest, stored: str, dtype: str = "float32") -> ModelUnderTest:
    """A model folder of the work dir, verified now against what its step recorded: a changed or
    truncated model is refused before anything is measured or read from the cache."""

    verify_checkpoint(workdir, manifest, stored)
    path = workdir.resolve(stored)
    return ModelUnderTest(stored, ModelSource("local", str(path), path=path),
                          lambda device: load_checkpoint(path, device=device, dtype=torch_dtype(dtype)), dtype=dtype)


def _target(workdir: Workdir, manifest: Manifest, generation: Generation, model: str, dtype: str) -> ModelUnderTest:
    if model == "base":
        return base_under_test(workdir, manifest, dtype)
    if model == "current":
        require_open(generation)
        checkpoint = latest_checkpoint(generation)
        if checkpoint is None:
            raise LayermoeError(f"G{generation.index} has no expanded model yet: run `layermoe expand` first "
                                "(or `eval --model base`)")
        return checkpoint_under_test(workdir, manifest, checkpoint, dtype)
    if not Path(model).is_dir():
        raise LayermoeError(f"--model must be base, current, or a checkpoint folder; {model} is none of them")
    return checkpoint_under_test(workdir, manifest, workdir.rel(model), dtype)


# ---------------------------------------------------------------------------- the step


def evaluate_generation(workdir: Workdir, manifest: Manifest, generation: Generation, options: EvalOptions) -> None:
    """Figures are cached per dtype (auto: bfloat16 on CUDA, float32 on CPU); batch_size is lm-eval's
    (an integer, `auto` or `auto:N`)."""
    langs, model, max_tokens, tasks = options.langs, options.model, options.max_tokens, options.tasks
    num_fewshot, limit, device, as_json = options.num_fewshot, options.limit, options.device, options.as_json
    force, include_path, data, text_field = options.force, options.tasks_path, options.data, options.text_field
    dtype, batch_size = options.dtype, options.batch_size
    if "langs" in options.model_fields_set and not langs:
        raise LayermoeError("--langs is empty: give comma-separated languages, e.g. --langs el,hu (or leave it out to "
                            "measure every language)")
    known = manifest.generation_of_language()
    languages = list(langs) or [lang for lang in known if known[lang] <= generation.index]
    unknown = [lang for lang in languages if lang not in known]
    if unknown:
        raise LayermoeError(f"{', '.join(unknown)} is not a language of this work dir ({', '.join(known)})")
    if max_tokens is not None and max_tokens < 1:
        raise LayermoeError("--max-tokens must be positive")
    lm_eval_batch_size = parse_batch_size(batch_size)
    device = resolve_device(device)
    dtype = dtype_name(resolve_dtype(dtype, device))
    target = _target(workdir, manifest, generation, model, dtype)
    test_sets = load_test_sets(workdir, data, text_field)
    texts = held_out_texts(workdir, manifest, languages, max_tokens)
    cache = EvalCache(workdir.cache_dir / "eval")

    def jobs(routing: bool) -> list[EvalJob]:  # the held-out split (capped), then the test sets (in full, no routing)
        return ([EvalJob(lang, lang, texts[lang], max_tokens, routing=routing, generation=known[lang])
                 for lang in languages] + [EvalJob(t.name, t.language, t.texts) for t in test_sets])

    base_record = manifest.generations[0].eval
    run = _EvalRun(workdir, manifest, generation, test_sets, max_tokens, device, cache)
    asked = _Asked(force, list(tasks), num_fewshot, limit, include_path, lm_eval_batch_size)
    if not _benchmarks_known(base_record if target.label == "base" else generation.eval, target, asked):
        # every task's data before any model loads (the base model's bits per byte come first)
        asked.loaded = check_tasks_load(asked.tasks, include_path=include_path)
    if target.label == "base":
        record = base_record
        changed = _measure_record(run, record, target, jobs(False), "eval of the base model", asked, merge=True)
    else:  # the base model's figures beside them: measured once, then from the cache
        base = base_under_test(workdir, manifest, dtype)
        changed = _measure_record(run, base_record, base, jobs(False), "eval of the base model", _Asked(),
                                  merge=True, quiet=True)
        base.release()
        record = generation.eval
        changed |= _measure_record(run, record, target, jobs(target.expanded), f"eval of G{generation.index}", asked)
    target.release()
    if changed:
        _write_report(workdir, manifest)
    if as_json:
        sys.stdout.write(json.dumps(_numbers(manifest, generation, record), indent=2) + "\n")
    else:
        console.print(eval_table(manifest, generation, record))
        if record.test_sets:
            console.print(test_set_table(manifest, record))
        if record.lm_eval and record.lm_eval.get("results"):
            console.print(lm_eval_table(manifest, record))


@dataclass
class _EvalRun:
    """What every record measured by one `eval` shares."""

    workdir: Workdir
    manifest: Manifest
    generation: Generation
    test_sets: list[TestSet]
    max_tokens: int | None
    device: str
    cache: EvalCache


@dataclass
class _Asked:
    """What the user asked of a record beyond bits per byte: lm-eval tasks, and measuring again."""

    force: bool = False
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None
    include_path: Path | None = None
    batch_size: int | str = 1
    loaded: LoadedTasks | None = None  # the tasks, their data loaded before any model (check_tasks_load)


def _benchmark_config(record: EvalRecord, model: ModelUnderTest, asked: _Asked, known: bool) -> dict:
    """The lm-eval settings of the run `record` will hold last: those asked when they are run (not `known`,
    from `_benchmarks_known`), else (the same model) those it holds."""
    if asked.tasks and not known:
        return {"tasks": list(asked.tasks), "num_fewshot": asked.num_fewshot, "limit": asked.limit}
    if _same_model(record, model) and record.lm_eval is not None:
        return {k: record.config.get(k) for k in BENCHMARK_KEYS}
    return {}


def _same_model(record: EvalRecord, model: ModelUnderTest) -> bool:
    return record.status == StepStatus.done and record.config.get("model_sha256") == model.fingerprint


def _benchmarks_known(record: EvalRecord, model: ModelUnderTest, asked: _Asked) -> bool:
    """True when no lm-eval task is asked, or `record` holds `model`'s scores of every task asked, scored with
    these settings (by this run or an earlier one)."""
    return not asked.tasks or (_same_model(record, model) and not asked.force and record.lm_eval is not None
                               and scores_known(record.lm_eval, asked.tasks, asked.num_fewshot, asked.limit))


BENCHMARK_KEYS = ("tasks", "num_fewshot", "limit")


def _measure_record(run: _EvalRun, record: EvalRecord, model: ModelUnderTest, jobs: list[EvalJob], label: str,
                    asked: _Asked, merge: bool = False, quiet: bool = False) -> bool:
    """Fill `record` with `model`'s figures on `jobs`, from the cache where they were measured before; True if it changed.

    Nothing is written when the record would not change (the same model, texts and settings
    again: said on stderr unless `quiet`). merge: keep the record's other languages of the same
    model and token cap (G0's record gathers the base model's figures over every eval). Test
    sets and lm-eval results of the same model are kept.
    """
    workdir, manifest, generation, test_sets = run.workdir, run.manifest, run.generation, run.test_sets
    max_tokens, device, cache = run.max_tokens, run.device, run.cache
    force, tasks, num_fewshot, limit = asked.force, asked.tasks, asked.num_fewshot, asked.limit
    include_path, batch_size = asked.include_path, asked.batch_size

    same_model = _same_model(record, model)
    # read now: run_step replaces the config (records from before --dtype were float32)
    same_cap = (same_model and record.config.get("max_tokens") == max_tokens
                and record.config.get("dtype", "float32") == model.dtype)
    config = dict(model=model.label, model_sha256=model.fingerprint, max_tokens=max_tokens, dtype=model.dtype)
    benchmarks_known = _benchmarks_known(record, model, asked)
    config.update(_benchmark_config(record, model, asked, benchmarks_known))
    held_out = [job.name for job in jobs if job.name not in {t.name for t in test_sets}]
    known = manifest.generation_of_language()

    def fill(rec: EvalRecord, measured: Measured) -> None:
        kept = rec.languages if merge and same_cap else {}
        rec.languages = {**kept, **{name: LanguageEval(**measured.evals[name].to_dict()) for name in held_out}}
        rec.test_sets = {**(rec.test_sets if same_model else {}), **{
            t.name: NamedTestSet(**measured.evals[t.name].to_dict(), language=t.language, source=t.source, kind=t.kind,
                                 sha256=t.sha256, transfer=t.language not in known) for t in test_sets}}
        rec.routing = summarise_routing(measured.routing, known, generation.index).to_dict() if measured.routing else None
        if rec.routing is not None:
            # drawn by the report (render_report), like every figure that comes from the manifest
            rec.outputs["routing_plot"] = workdir.rel(workdir.generation_dir(generation.index) / "routing.png")
        if not benchmarks_known:

            loaded, tokenizer = model.load(device)
            scores = run_lm_eval(loaded, tokenizer, list(tasks), num_fewshot=num_fewshot, limit=limit,
                                 include_path=include_path, batch_size=batch_size, loaded=asked.loaded)
            rec.lm_eval = merge_benchmark_runs(rec.lm_eval if same_model else None, scores)
        elif not same_model:
            rec.lm_eval = None
        rec.model, rec.config = model.label, config
        _summarise(manifest, generation, rec, of_base=model.label == "base")

    if benchmarks_known and not force:
        found, missing = from_cache(cache, model, jobs)
        if not missing:
            trial = record.model_copy(deep=True)
            fill(trial, found)
            if record.status == StepStatus.done and trial.model_dump(mode="json") == record.model_dump(mode="json"):
                if not quiet:
                    err_console.print(f"[green]✓[/] {label} is up to date: the model (sha256 {model.fingerprint[:12]}), "
                                      "texts and settings are those it was measured with; the figures are the cached ones "
                                      "(--force measures again)", soft_wrap=True, highlight=False)
                return False
    with run_step(workdir, manifest, record, label, config, force=True) as rec:
        with token_progress("eval" if model.label != "base" else "eval base") as update:
            measured = measure_cached(cache, model, jobs, device=device, force=force, progress=update)
        if not measured.measured and not quiet:
            err_console.print(f"[green]✓[/] {label}: every figure comes from the cache (the same model sha256 "
                              f"{model.fingerprint[:12]}, texts and settings were measured before)", soft_wrap=True,
                              highlight=False)
        fill(rec, measured)
    return True


def _summarise(manifest: Manifest, generation: Generation, record: EvalRecord, of_base: bool) -> None:

    known = manifest.generation_of_language()
    bpb = {lang: r.bpb for lang, r in record.languages.items()}
    groups = group_averages(bpb, known, generation.index)
    record.old_avg, record.new_avg = groups["old_avg"], groups["new_avg"]
    record.metrics["by_generation"] = {str(g): v for g, v in groups["by_generation"].items()}
    base = {lang: r.bpb for lang, r in manifest.generations[0].eval.languages.items()}
    if not of_base and base:
        record.metrics.update(forgetting_and_gain(bpb, base, known, generation.index))


def _write_report(workdir: Workdir, manifest: Manifest) -> None:
    render_report(manifest.model_dump(mode="json"), workdir.root)


# ---------------------------------------------------------------------------- output


def _numbers(manifest: Manifest, generation: Generation, record: EvalRecord) -> dict:
    base = manifest.generations[0].eval
    known = manifest.generation_of_language()
    return {
        "generation": generation.index,
        "model": record.model,
        "model_sha256": record.config.get("model_sha256"),
        "languages": {lang: {**r.model_dump(), "base_bpb": base.languages[lang].bpb if lang in base.languages else None}
                      for lang, r in record.languages.items()},
        "test_sets": {name: {**t.model_dump(), "generation": known.get(t.language),
                             "base_bpb": base.test_sets[name].bpb if name in base.test_sets else None}
                      for name, t in record.test_sets.items()},
        "old_avg": record.old_avg,
        "new_avg": record.new_avg,
        "metrics": record.metrics,
        "lm_eval": (record.lm_eval or {}).get("results"),
        "lm_eval_settings": {task: settings_of(record.lm_eval, task) for task in (record.lm_eval or {}).get("results", {})},
    }


def _delta(value: float, before) -> str:
    return "—" if before is None else signed(value - before.bpb)


def eval_table(manifest: Manifest, generation: Generation, record: EvalRecord) -> Table:
    known = manifest.generation_of_language()
    base = manifest.generations[0].eval.languages
    table = Table(title=f"held-out bits per byte — {record.model} (lower is better)", title_justify="left")
    for column in ("language", "generation", "base bpb", "bpb", "Δ", "tokens"):
        table.add_column(column, justify="left" if column == "language" else "right")
    is_base = record is manifest.generations[0].eval
    for lang, result in sorted(record.languages.items(), key=lambda kv: (known.get(kv[0], 0), kv[0])):
        before = base.get(lang)
        table.add_row(lang, f"G{known.get(lang, '?')}", f"{before.bpb:.4f}" if before else "—", f"{result.bpb:.4f}",
                      "—" if is_base else _delta(result.bpb, before), f"{result.tokens:,}" if result.tokens else "—")
    parts = []
    if record.old_avg is not None:
        parts.append(f"Old-avg {record.old_avg:.4f}")
    if record.new_avg is not None:
        parts.append(f"New-avg {record.new_avg:.4f}")
    for key in ("forgetting", "gain"):
        if record.metrics.get(key) is not None:
            parts.append(f"{key} {signed(record.metrics[key])}")
    table.caption = " · ".join(parts)
    table.min_width = len(table.caption)  # the summary on one line (Rich wraps a caption at the table's width)
    return table


def test_set_table(manifest: Manifest, record: EvalRecord) -> Table:
    """The user's own test sets, each on its own row (measured in full; transfer = a language not in the lineage)."""
    known = manifest.generation_of_language()
    base = manifest.generations[0].eval.test_sets
    is_base = record is manifest.generations[0].eval
    table = Table(title=f"your test sets, bits per byte — {record.model} (lower is better)", title_justify="left")
    longest = max((len(name) for name in record.test_sets), default=0)
    for column in ("test set", "generation", "documents", "tokens", "base bpb", "bpb", "Δ"):
        if column == "test set":  # never shortened to "…": a narrow terminal wraps the other columns instead
            table.add_column(column, justify="left", no_wrap=True, min_width=max(longest, len(column)))
        else:
            table.add_column(column, justify="right")
    for name, result in sorted(record.test_sets.items()):
        before = base.get(name)
        table.add_row(name, "transfer" if result.transfer else f"G{known[result.language]}",
                      f"{result.documents:,}" if getattr(result, "documents", None) else "—",
                      f"{result.tokens:,}" if result.tokens else "—", f"{before.bpb:.4f}" if before else "—",
                      f"{result.bpb:.4f}", "—" if is_base else _delta(result.bpb, before))
    return table


def _metric_rows(results: dict) -> list[tuple[str, str, str, object, object]]:
    """(task, metric key, shown name, value, stderr) of every metric lm-eval gave; its keys are
    "metric,filter" ("acc,none", "exact_match,strict-match") beside "metric_stderr,filter"."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key:  # "name", "sample_len", "alias": about the task, not a score
                continue
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            shown = metric if filter_name in ("none", "") else f"{metric} ({filter_name})"
            rows.append((task, key, shown, value, metrics.get(f"{metric}_stderr,{filter_name}")))
    return rows


def _score(value) -> str:
    if isinstance(value, bool) or value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:.4f}"
    return "—"  # "N/A" and the like


def lm_eval_table(manifest: Manifest, record: EvalRecord) -> Table:
    """Every lm-eval task's metrics, ± their standard error where lm-eval gives one, beside the base
    model's (G0's record) when it was scored on the same task with the same few-shot and limit."""
    lm_eval = record.lm_eval or {}
    base_record = manifest.generations[0].eval
    is_base = record is base_record
    base = base_record.lm_eval or {}
    rows = _metric_rows(lm_eval.get("results", {}))

    def scored_with(of: dict, task: str) -> tuple:
        settings = settings_of(of, task)
        return settings.get("num_fewshot"), settings.get("limit")

    # one run's settings for every row: said once, under the table; several: a column of few-shot counts
    used = {scored_with(lm_eval, task) for task, *_ in rows}
    shots_column = len(used) > 1
    settings = []
    if not shots_column:
        num_fewshot, limit = next(iter(used), (None, None))
        settings = [f"num_fewshot {num_fewshot}" if num_fewshot is not None else "num_fewshot: each task's own",
                    f"limit {limit}" if limit else "every document"]
    versions = sorted({str(settings_of(lm_eval, task).get("lm_eval_version")) for task, *_ in rows} - {"None"})
    settings += [f"lm-eval {version}" for version in versions]
    table = Table(title=f"lm-eval tasks — {record.model}", title_justify="left",
                  caption=" · ".join(settings) if settings else None)
    n_samples = lm_eval.get("n_samples", {})
    columns = ["task", *(("shots",) if shots_column else ()), "metric", "samples", *(() if is_base else ("base",)),
               "value", "± stderr", *(() if is_base else ("Δ",))]
    body = []
    for task, key, shown, value, stderr in rows:
        counts = n_samples.get(task) or {}
        effective, original = counts.get("effective"), counts.get("original")
        samples = ("—" if effective is None else f"{effective:,}" if original in (None, effective)
                   else f"{effective:,} of {original:,}")
        num_fewshot, _ = scored_with(lm_eval, task)
        cells = [task, *((("—" if num_fewshot is None else str(num_fewshot)),) if shots_column else ()), shown, samples]
        # the base model's score only when it was scored with the same few-shot count and limit
        comparable = not is_base and task in base.get("results", {}) and scored_with(base, task) == scored_with(lm_eval, task)
        before = base["results"][task].get(key) if comparable else None
        if not is_base:
            cells.append(_score(before))
        cells += [_score(value), "—" if _score(stderr) == "—" else f"±{stderr:.4f}"]
        if not is_base:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, before))
            cells.append(signed(value - before) if numeric else "—")
        body.append(cells)
    # nothing shortened to "…": the figures keep their widest cell, and on a narrow terminal a long
    # task or metric name folds onto the next lines (whole) rather than push the figures out of sight
    for i, column in enumerate(columns):
        widest = max([len(column)] + [len(cells[i]) for cells in body])
        if column in ("task", "metric"):
            table.add_column(column, justify="left", overflow="fold", min_width=min(widest, 16 if column == "task" else 12))
        else:
            table.add_column(column, justify="right", no_wrap=True, min_width=widest)
    for cells in body:
        table.add_row(*cells)
    return table
