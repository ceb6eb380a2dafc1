"""How much the earlier languages move when a model changes under them: bits per byte before and
right after an extension (a new generation's experts, new vocabulary rows), through the eval cache."""

from __future__ import annotations

from rich.table import Table

from layermoe.core.console import console, err_console
from layermoe.core.manifest import Generation, Manifest, StepStatus
from layermoe.core.progress import token_progress
from layermoe.core.workdir import Workdir
from layermoe.pipeline.common import documents_for_tokens, latest_checkpoint, texts_for
from layermoe.pipeline.eval_cache import EvalCache, EvalJob, measure_cached
from layermoe.pipeline.evaluate import base_under_test, checkpoint_under_test

DEFAULT_DRIFT_TOKENS = 20_000  # held-out tokens per earlier language when no eval of the previous model sets the cap


def measure_drift(workdir: Workdir, manifest: Manifest, generation: Generation, device: str, max_tokens: int | None) -> dict:
    """Bits per byte of every earlier language, before and right after the extension (recorded in the manifest).

    Both go through the eval cache: "before" is the previous generation's model, which its own
    eval has usually measured on the same held-out texts already. `max_tokens` None takes the
    cap of that eval (so the figures are shared), else DEFAULT_DRIFT_TOKENS. Both models are
    loaded in that eval's dtype, else in float32 (the drift is a small difference).
    """

    previous = manifest.generations[generation.index - 1]
    before_model = latest_checkpoint(previous) if previous.index >= 1 else "base"  # G1: against the base model
    evaluated = previous.eval.status == StepStatus.done and previous.eval.model == before_model
    dtype = previous.eval.config.get("dtype", "float32") if evaluated else "float32"
    if max_tokens is None:
        max_tokens = previous.eval.config.get("max_tokens") if evaluated else DEFAULT_DRIFT_TOKENS
    texts = {lang: texts_for(workdir, generation, lang, "heldout", limit=documents_for_tokens(max_tokens))
             for lang in generation.old_languages}
    jobs = [EvalJob(lang, lang, texts[lang], max_tokens) for lang in generation.old_languages]
    cache = EvalCache(workdir.cache_dir / "eval")
    figures = {}
    for label, checkpoint in (("before", before_model), ("after", generation.expansion.checkpoint)):
        if checkpoint == "base":
            model = base_under_test(workdir, manifest, dtype)
        else:
            model = checkpoint_under_test(workdir, manifest, checkpoint, dtype)
        with token_progress(f"bpb {label} extension") as update:
            measured = measure_cached(cache, model, jobs, device=device, progress=update)
        if not measured.measured:
            err_console.print(f"[green]✓[/] bpb {label} extension: {checkpoint} was measured on these texts already "
                              "(eval cache)", highlight=False, soft_wrap=True)
        figures[label] = {lang: r.bpb for lang, r in measured.evals.items()}
        model.release()
    drift = {lang: figures["after"][lang] - figures["before"][lang] for lang in texts}
    generation.expansion.metrics.update(bpb_before_extension=figures["before"], bpb_after_extension=figures["after"],
                                        bpb_drift=drift, bpb_drift_max=max(abs(d) for d in drift.values()),
                                        drift_tokens=max_tokens, drift_dtype=dtype)
    what = "opening" if generation.index >= 2 else "the new vocabulary of"
    table = Table(title=f"earlier languages right after {what} G{generation.index} (bits per byte)", title_justify="left")
    for column in ("language", "before", "after", "Δ"):
        table.add_column(column, justify="left" if column == "language" else "right")
    for lang in texts:
        table.add_row(lang, f"{figures['before'][lang]:.4f}", f"{figures['after'][lang]:.4f}", f"{drift[lang]:+.2e}")
    console.print(table)
    return drift
