"""`layermoe eval`: held-out bits per byte per language, old vs new, routing health, lm-eval, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.table import Table

from layermoe_cli.console import console, err_console
from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import EvalRecord, Generation, LanguageEval, Manifest, StepStatus
from layermoe_cli.pipeline.common import (
    documents_for_tokens,
    latest_checkpoint,
    load_base,
    load_recorded_checkpoint,
    resolve_device,
    texts_for,
    token_progress,
    verify_checkpoint,
)
from layermoe_cli.workdir import Workdir, run_step, session


def run_eval(workdir: Workdir, *, langs, model="current", max_tokens=None, tasks=(), num_fewshot=None, limit=None,
             device="auto", as_json=False, force=False, include_path=None) -> None:
    with session(workdir):
        manifest = workdir.load()
        generation = manifest.current
        evaluate_generation(workdir, manifest, generation, langs=langs, model=model, max_tokens=max_tokens, tasks=tasks,
                            num_fewshot=num_fewshot, limit=limit, device=device, as_json=as_json, force=force,
                            include_path=include_path)


def _data_home(manifest: Manifest, language: str) -> Generation:
    """The newest generation whose data record covers `language` (every generation lists all its languages)."""
    for generation in reversed(manifest.generations):
        if language in generation.data:
            return generation
    raise LayermoeError(f"no data recorded for {language}: run `layermoe profile` first")


def _held_out(workdir: Workdir, manifest: Manifest, languages: list[str], max_tokens: int | None) -> dict[str, list[str]]:
    texts = {}
    for language in languages:
        texts[language] = texts_for(workdir, _data_home(manifest, language), language, "heldout",
                                    limit=documents_for_tokens(max_tokens))
        if not texts[language]:
            raise LayermoeError(f"the held-out split of {language} is empty: give it more documents with --data")
    return texts


def evaluate_generation(workdir: Workdir, manifest: Manifest, generation: Generation, *, langs=(), model="current",
                        max_tokens=None, tasks=(), num_fewshot=None, limit=None, device="auto", as_json=False,
                        force=False, include_path=None) -> None:
    known = manifest.generation_of_language()
    languages = list(langs) or [lang for lang in known if known[lang] <= generation.index]
    unknown = [lang for lang in languages if lang not in known]
    if unknown:
        raise LayermoeError(f"{', '.join(unknown)} is not a language of this work dir ({', '.join(known)})")
    if max_tokens is not None and max_tokens < 1:
        raise LayermoeError("--max-tokens must be positive")
    device = resolve_device(device)
    checkpoint = latest_checkpoint(generation)
    if model == "current" and checkpoint is None:
        raise LayermoeError(f"G{generation.index} has no expanded model yet: run `layermoe expand` first (or `eval --model base`)")
    if model not in ("base", "current") and not Path(model).is_dir():
        raise LayermoeError(f"--model must be base, current, or a checkpoint folder; {model} is none of them")

    if model != "base":  # a changed or truncated model is refused before anything is measured
        verify_checkpoint(workdir, manifest, checkpoint if model == "current" else workdir.rel(model))

    # The base model's figures are measured once per --max-tokens and cached in G0's record.
    base_record = manifest.generations[0].eval
    same_budget = base_record.config.get("max_tokens") == max_tokens
    missing_base = [lang for lang in languages if lang not in base_record.languages or not same_budget]
    if missing_base and model != "base":
        _measure_into(workdir, manifest, base_record, "base", missing_base, max_tokens, device, tasks=(),
                      merge=same_budget, label="eval of the base model", force=True)
    if model == "base":
        _measure_into(workdir, manifest, base_record, "base", languages, max_tokens, device, tasks, num_fewshot, limit,
                      include_path, merge=same_budget, label="eval of the base model", force=True)
        record = base_record
    else:
        target = checkpoint if model == "current" else workdir.rel(model)
        _measure_into(workdir, manifest, generation.eval, target, languages, max_tokens, device, tasks, num_fewshot,
                      limit, include_path, merge=False, label=f"eval of G{generation.index}", force=force,
                      generation=generation)
        record = generation.eval
    _summarise(manifest, generation, record)
    workdir.save(manifest)
    _write_report(workdir, manifest)
    if as_json:
        sys.stdout.write(json.dumps(_numbers(manifest, generation, record), indent=2) + "\n")
    else:
        console.print(eval_table(manifest, generation, record))


def _measure_into(workdir, manifest, record: EvalRecord, model_ref: str, languages, max_tokens, device, tasks=(),
                  num_fewshot=None, limit=None, include_path=None, merge=False, label="eval", force=False,
                  generation: Generation | None = None) -> None:
    from layermoe_cli.evaluation import evaluate_languages, routing_health

    config = dict(model=model_ref, languages=sorted(languages), max_tokens=max_tokens, tasks=list(tasks),
                  num_fewshot=num_fewshot, limit=limit)
    if record.status == StepStatus.done and record.config == config and not force:
        err_console.print(f"[green]✓[/] {label} is up to date (same model and settings; use --force to measure again)")
        return
    texts = _held_out(workdir, manifest, languages, max_tokens)
    previous = dict(record.languages) if merge else {}
    with run_step(workdir, manifest, record, label, config, force=True) as rec:
        if model_ref == "base":
            model, tokenizer = load_base(workdir, manifest, device=device)
        else:
            model, tokenizer = load_recorded_checkpoint(workdir, manifest, model_ref, device=device)
        rec.model = model_ref
        with token_progress("eval") as update:
            results = evaluate_languages(model, tokenizer, texts, max_tokens=max_tokens, device=device, progress=update)
        rec.languages = {**previous, **{lang: LanguageEval(**r.to_dict()) for lang, r in results.items()}}
        if getattr(model.config, "model_type", None) == "layermoe" and generation is not None:
            health = routing_health(model, tokenizer, texts, manifest.generation_of_language(), generation.index,
                                    max_tokens=max_tokens, device=device)
            rec.routing = health.to_dict()
            # drawn by the report (render_report), like every figure that comes from the manifest
            rec.outputs["routing_plot"] = workdir.rel(workdir.generation_dir(generation.index) / "routing.png")
        if tasks:
            from layermoe_cli.lm_eval_bridge import run_lm_eval

            rec.lm_eval = run_lm_eval(model, tokenizer, list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      include_path=include_path)


def _summarise(manifest: Manifest, generation: Generation, record: EvalRecord) -> None:
    from layermoe_cli.evaluation import forgetting_and_gain, group_averages

    known = manifest.generation_of_language()
    bpb = {lang: r.bpb for lang, r in record.languages.items()}
    groups = group_averages(bpb, known, generation.index)
    record.old_avg, record.new_avg = groups["old_avg"], groups["new_avg"]
    record.metrics["by_generation"] = {str(g): v for g, v in groups["by_generation"].items()}
    base = {lang: r.bpb for lang, r in manifest.generations[0].eval.languages.items()}
    if record is not manifest.generations[0].eval and base:
        record.metrics.update(forgetting_and_gain(bpb, base, known, generation.index))


def _write_report(workdir: Workdir, manifest: Manifest) -> None:
    try:
        from layermoe_cli.report import render_report
    except ImportError:
        return
    render_report(manifest.model_dump(mode="json"), workdir.root)


def _numbers(manifest: Manifest, generation: Generation, record: EvalRecord) -> dict:
    base = manifest.generations[0].eval.languages
    return {
        "generation": generation.index,
        "model": record.model,
        "languages": {lang: {**r.model_dump(), "base_bpb": base[lang].bpb if lang in base else None}
                      for lang, r in record.languages.items()},
        "old_avg": record.old_avg,
        "new_avg": record.new_avg,
        "metrics": record.metrics,
        "lm_eval": (record.lm_eval or {}).get("results"),
    }


def eval_table(manifest: Manifest, generation: Generation, record: EvalRecord) -> Table:
    known = manifest.generation_of_language()
    base = manifest.generations[0].eval.languages
    table = Table(title=f"held-out bits per byte — {record.model} (lower is better)", title_justify="left")
    for column in ("language", "generation", "base bpb", "bpb", "Δ", "tokens"):
        table.add_column(column, justify="left" if column == "language" else "right")
    for lang, result in sorted(record.languages.items(), key=lambda kv: (known.get(kv[0], 0), kv[0])):
        before = base.get(lang)
        delta = "—" if before is None or record is manifest.generations[0].eval else f"{round(result.bpb - before.bpb, 4) + 0.0:+.4f}"
        table.add_row(lang, f"G{known.get(lang, '?')}", f"{before.bpb:.4f}" if before else "—", f"{result.bpb:.4f}", delta,
                      f"{result.tokens:,}" if result.tokens else "—")
    parts = []
    if record.old_avg is not None:
        parts.append(f"Old-avg {record.old_avg:.4f}")
    if record.new_avg is not None:
        parts.append(f"New-avg {record.new_avg:.4f}")
    for key in ("forgetting", "gain"):
        if record.metrics.get(key) is not None:
            parts.append(f"{key} {round(record.metrics[key], 4) + 0.0:+.4f}")  # no "-0.0000"
    table.caption = " · ".join(parts)
    return table
