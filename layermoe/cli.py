"""The `layermoe` command line. Thin: each command parses its options and calls one pipeline step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape

from layermoe import __version__
from layermoe.core.console import console, err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.workdir import StepAlreadyDone, Workdir, disk_full_message

app = typer.Typer(
    name="layermoe",
    help="Teach a dense causal LM new languages without forgetting the old ones (LayerMoE, ACL 2025).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"layermoe {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    workdir: Path = typer.Option(
        Path("layermoe-run"), "--workdir", "-w", envvar="LAYERMOE_WORKDIR", help="Work dir holding manifest.json and all outputs."
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify", envvar="LAYERMOE_NO_VERIFY",
        help="Read models and checkpoints without checking them against the sha256 recorded when they were written (a warning says so).",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from layermoe.core.integrity import set_verification

    set_verification(not no_verify)
    ctx.obj = Workdir(workdir)


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-file bars are noise."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        return
    from layermoe.compat import silence_gguf_progress

    silence_gguf_progress()  # the GGUF conversion's own bar


def _call(step: Callable, *args, **kwargs):
    """Run one pipeline step; bad input becomes one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        return step(*args, **kwargs)
    except LayermoeError as e:
        # the message is text, not markup: a path or value with [brackets] or :x: is shown as given
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False, emoji=False)
        raise typer.Exit(e.exit_code)
    except StepAlreadyDone as e:
        console.print(f"[green]✓[/] {escape(str(e))}", soft_wrap=True, highlight=False, emoji=False)
        raise typer.Exit(0)
    except (OSError, RuntimeError) as e:  # a full disk is the user's to fix; anything else is a bug: a traceback
        workdir = next((a for a in args if isinstance(a, Workdir)), None)
        message = disk_full_message(workdir.root, e) if workdir is not None else None
        if message is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False, emoji=False)
        raise typer.Exit(2)


def _split(value: Optional[str]) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else []


@app.command(epilog="Example: layermoe profile --model Qwen/Qwen1.5-1.8B --old en,zh,es --new el,hu,tr --data el=el.txt")
def profile(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: local dir, hub id, .gguf file, or `demo`. Needed for a new work dir."),
    old: Optional[str] = typer.Option(None, "--old", help="Comma-separated languages the base model already handles (G0)."),
    new: Optional[str] = typer.Option(None, "--new", help="Comma-separated languages to add in this generation."),
    data: list[str] = typer.Option([], "--data", "-d", help="LANG=SPEC (.txt/.jsonl/.json/.parquet file or dir, hf:NAME[:CONFIG[:SPLIT]], builtin). Repeatable."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.json/.parquet/hf data."),
    tokens: int = typer.Option(100_000, help="Tokens sampled per language (paper: 100,000)."),
    batch_tokens: int = typer.Option(8192, help="Tokens per forward batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16"),
    seed: int = typer.Option(0, help="Seed of the token sample."),
    include_bos: bool = typer.Option(False, "--include-bos", help="Keep the beginning-of-sequence token."),
    neuron_top_n: int = typer.Option(1000, "--neuron-top-n", help="Language-specific neurons kept per language (NeuronMoE; 0 = no neuron count)."),
    neuron_docs: int = typer.Option(500, "--neuron-docs", help="Documents per language whose pooled FFN responses rank the neurons."),
    force: bool = typer.Option(False, "--force", help="Redo the step even if it is done."),
) -> None:
    """Measure how similar languages are at every layer (Eq. 8-9) and count language-specific neurons."""
    from layermoe.pipeline.profile import run_profile

    _call(run_profile, ctx.obj, model=model, old=_split(old), new=_split(new), data=data, text_field=text_field,
          tokens=tokens, batch_tokens=batch_tokens, device=device, dtype=dtype, seed=seed, include_bos=include_bos, force=force,
          neuron_top_n=neuron_top_n, neuron_documents=neuron_docs)


@app.command(epilog="Example: layermoe allocate --budget 72   (24 layers: 24 original + 48 new experts); "
                     "layermoe allocate --strategy neuron --neuron-mapping linear --min-experts 1 --max-experts 6")
def allocate(
    ctx: typer.Context,
    budget: Optional[int] = typer.Option(None, "--budget", help="δ: total experts over all layers, counting each layer's expert 0."),
    new_experts: Optional[int] = typer.Option(None, "--new-experts", help="New experts in all; same as --budget N + layers."),
    strategy: str = typer.Option("layerwise", help="layerwise (Eq. 10) | neuron (NeuronMoE: language-specific neurons) | uniform (MoE-LPR) | random (ablation)"),
    classifier_layers: Optional[int] = typer.Option(None, "--classifier-layers", help="K layers of highest similarity get a routing classifier (default 30% of layers; 0 = none)."),
    rounding: str = typer.Option("exact", help="exact (Σ N^i = δ) | ceil (the paper's literal formula)"),
    max_per_layer: Optional[int] = typer.Option(None, "--max-per-layer", help="Cap on experts in one layer."),
    neuron_mapping: str = typer.Option("proportional", "--neuron-mapping", help="neuron strategy: proportional (Σ N^i = δ) | linear (the authors' min-max formula, not budget-bound)"),
    min_experts: Optional[int] = typer.Option(None, "--min-experts", help="Linear neuron mapping: experts of the layer with fewest neurons (default 1)."),
    max_experts: Optional[int] = typer.Option(None, "--max-experts", help="Linear neuron mapping: experts of the layer with most neurons (default 6)."),
    seed: int = typer.Option(0, help="Seed of the random strategy."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Decide how many experts each layer gets (Eq. 10, or from language-specific neurons)."""
    from layermoe.pipeline.allocate import run_allocate

    _call(run_allocate, ctx.obj, budget=budget, new_experts=new_experts, strategy=strategy, classifier_layers=classifier_layers,
          rounding=rounding, max_per_layer=max_per_layer, seed=seed, force=force, neuron_mapping=neuron_mapping,
          min_experts=min_experts, max_experts=max_experts)


@app.command(epilog="Example: layermoe expand --budget 72")
def expand(
    ctx: typer.Context,
    budget: Optional[int] = typer.Option(None, "--budget", help="Run `allocate --budget` first when there is no allocation yet."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Experts per token (default 2; set when G1 is expanded, kept by later generations)."),
    classifier_granularity: Optional[str] = typer.Option(None, help="token (the paper, default) | sequence (a causal running mean over the document; G1 only)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Upcycle the model into the layer-wise mixture of experts; save a Hugging Face checkpoint."""
    from layermoe.pipeline.expand import run_expand

    _call(run_expand, ctx.obj, budget=budget, top_k=top_k, classifier_granularity=classifier_granularity, device=device, force=force)


@app.command(epilog="Example: layermoe prepare --stage 1 --tokens-per-language 50000000")
def prepare(
    ctx: typer.Context,
    stage: int = typer.Option(..., "--stage", min=1, max=2, help="1: the new languages; 2: those plus a replay of the old ones."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML with training options; its data settings are used (flags override them)."),
    tokens_per_language: Optional[int] = typer.Option(None, "--tokens-per-language", help="Token budget per new language: reading stops once it is met."),
    docs_per_new_language: Optional[int] = typer.Option(None, "--docs-per-new-language", help="Document budget per new language (stage 2 default: 100,000)."),
    tokens_per_old_language: Optional[int] = typer.Option(None, "--tokens-per-old-language", help="Stage 2: token budget per replayed old language."),
    docs_per_old_language: Optional[int] = typer.Option(None, "--docs-per-old-language", help="Stage 2: document budget per replayed old language."),
    replay_ratio: Optional[float] = typer.Option(None, "--replay-ratio", help="Stage 2: old-language documents = this x the mean new-language count (default 0.5)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the document choice under a budget and of the packing order."),
    num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Tokenising processes (default: every usable core)."),
    force: bool = typer.Option(False, "--force", help="Prepare again even if prepared for these settings."),
) -> None:
    """Read, split, tokenise and pack a stage's training data once (train runs it when needed)."""
    from layermoe.pipeline.prepare import run_prepare

    overrides = dict(tokens_per_language=tokens_per_language, docs_per_new_language=docs_per_new_language,
                     tokens_per_old_language=tokens_per_old_language, docs_per_old_language=docs_per_old_language,
                     replay_ratio=replay_ratio, seed=seed)
    _call(run_prepare, ctx.obj, stage=stage, recipe=recipe, overrides={k: v for k, v in overrides.items() if v is not None},
          num_proc=num_proc, force=force)


@app.command(epilog="Example: layermoe train --stage 1 --max-steps 1000 && layermoe train --stage 2")
def train(
    ctx: typer.Context,
    stage: int = typer.Option(..., "--stage", help="1: new experts learn the new languages; 2: routers learn to protect old ones."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML with training options (flags override it)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    token_budget: Optional[int] = typer.Option(None, "--token-budget", help="Stop after this many training tokens."),
    tokens_per_language: Optional[int] = typer.Option(None, "--tokens-per-language", help="Token budget per new language when the data is prepared (see `prepare`)."),
    num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Tokenising processes if the data must be prepared (default: every usable core)."),
    learning_rate: Optional[float] = typer.Option(None, "--lr"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch"),
    grad_accum_steps: Optional[int] = typer.Option(None, "--grad-accum"),
    precision: Optional[str] = typer.Option(None, help="auto | bf16 | fp32"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    seed: Optional[int] = typer.Option(None),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Experiment trackers: tensorboard, wandb, mlflow (comma-separated), all, none, or auto (tensorboard when installed). wandb offline: WANDB_MODE=offline."),
    process_group_timeout: Optional[int] = typer.Option(None, "--process-group-timeout", help="Minutes a collective call may wait for a slow rank (default 60)."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train stage 1 or 2 (resumes from the last checkpoint after a crash)."""
    from layermoe.pipeline.train import run_train

    overrides = dict(max_steps=max_steps, token_budget=token_budget, learning_rate=learning_rate, seq_len=seq_len,
                     micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, precision=precision,
                     checkpoint_every=checkpoint_every, seed=seed, tokens_per_language=tokens_per_language,
                     report_to=report_to, process_group_timeout_minutes=process_group_timeout)
    _call(run_train, ctx.obj, stage=stage, recipe=recipe, overrides={k: v for k, v in overrides.items() if v is not None},
          force=force, num_proc=num_proc)


@app.command("eval", epilog="Example: layermoe eval --max-tokens 20000 --data el=flores/ell_Grek.devtest.txt")
def eval_(
    ctx: typer.Context,
    langs: Optional[str] = typer.Option(None, "--langs", help="Comma-separated languages (default: every language of every generation)."),
    data: list[str] = typer.Option([], "--data", "-d", help="LANG=SPEC: your own test set, evaluated in full beside the held-out split (any SPEC profile takes; a language outside the lineage measures transfer). Repeatable."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.json/.parquet/hf test sets."),
    model: str = typer.Option("current", "--model", help="base | current | PATH"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on held-out tokens per language."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks, comma-separated."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    tasks_path: Optional[Path] = typer.Option(None, "--tasks-path", help="Folder of extra lm-eval task YAMLs (e.g. local data)."),
    batch_size: str = typer.Option("1", "--batch-size", help="lm-eval's batch size: N, auto (the largest that fits) or auto:N."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="The models' weights: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON only."),
    force: bool = typer.Option(False, "--force", help="Measure again even if this model was measured with these settings."),
) -> None:
    """Bits per byte on held-out text and your own test sets, old vs new languages, routing health (one pass, cached)."""
    from layermoe.pipeline.evaluate import run_eval

    _call(run_eval, ctx.obj, langs=_split(langs), model=model, max_tokens=max_tokens, tasks=_split(tasks),
          num_fewshot=num_fewshot, limit=limit, device=device, as_json=as_json, force=force, include_path=tasks_path,
          data=data, text_field=text_field, dtype=dtype, batch_size=batch_size)


@app.command(epilog='Example: layermoe generate --prompt "Καλημέρα, σήμερα" --model current --compare base')
def generate(
    ctx: typer.Context,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    model: str = typer.Option("current", "--model", help="base | current | gN (g0 = base) | PATH (a model folder or .gguf)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Show this model's continuation beside it, e.g. base."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0 = greedy (the default); above 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest token set with this much probability."),
    seed: int = typer.Option(0, help="Seed of the sampling."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="The models' weights: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16."),
) -> None:
    """Continue a prompt with a model of the lineage (KV cache, streamed). Read-only: runs even while training."""
    from layermoe.pipeline.generate import run_generate

    _call(run_generate, ctx.obj, prompt=prompt, model=model, compare=compare, max_new_tokens=max_new_tokens,
          temperature=temperature, top_p=top_p, seed=seed, device=device, dtype=dtype)


@app.command(epilog="Example: layermoe extend --new bn,hi,ne --budget 72")
def extend(
    ctx: typer.Context,
    new: str = typer.Option(..., "--new", help="Comma-separated languages of the next generation."),
    data: list[str] = typer.Option([], "--data", "-d", help="LANG=SPEC, repeatable (earlier languages keep their data)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="δ of the new generation, counting expert 0 of every layer."),
    new_experts: Optional[int] = typer.Option(None, "--new-experts"),
    strategy: str = typer.Option("layerwise", help="layerwise | neuron | uniform | random"),
    neuron_mapping: str = typer.Option("proportional", "--neuron-mapping", help="neuron strategy: proportional | linear"),
    min_experts: Optional[int] = typer.Option(None, "--min-experts", help="Linear neuron mapping (default 1)."),
    max_experts: Optional[int] = typer.Option(None, "--max-experts", help="Linear neuron mapping (default 6)."),
    classifier_layers: Optional[int] = typer.Option(None, "--classifier-layers"),
    tokens: int = typer.Option(100_000, help="Tokens sampled per language for the profile."),
    classifier: str = typer.Option("generation", help="generation (lifelong prior) | binary (the paper's old-vs-new)"),
    expert_init: str = typer.Option("expert0", "--expert-init", help="New experts start as copies of: expert0 | routed (per layer, the expert the new languages' tokens are routed to most)"),
    router_init: Optional[str] = typer.Option(None, help="How the new experts' router rows start: expert0 | source | mean | zeros | normal (default: expert0; source with --expert-init routed)"),
    drift_tokens: Optional[int] = typer.Option(None, help="Held-out tokens per earlier language for the before/after check (default: the cap of the previous generation's eval, whose figures then serve as 'before'; else 20,000)."),
    device: str = typer.Option("auto"),
) -> None:
    """Open the next generation: profile, allocate and expand again; earlier experts stay frozen."""
    from layermoe.pipeline.extend import run_extend

    _call(run_extend, ctx.obj, new=_split(new), data=data, budget=budget, new_experts=new_experts, strategy=strategy,
          classifier_layers=classifier_layers, tokens=tokens, classifier=classifier, router_init=router_init,
          drift_tokens=drift_tokens, device=device, expert_init=expert_init, neuron_mapping=neuron_mapping,
          min_experts=min_experts, max_experts=max_experts)


@app.command(epilog="Example: layermoe status --json | jq .generations[1].allocation")
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout, nothing else."),
) -> None:
    """Show the lineage: base model, generations, each step's state, parameter counts."""
    from layermoe.pipeline.status import show_status

    _call(show_status, ctx.obj, as_json=as_json)


@app.command(epilog="Example: layermoe run recipes/qwen1.5-1.8b.yaml")
def run(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="A recipe YAML (see recipes/)."),
) -> None:
    """Run or resume every step of a recipe through the same manifest."""
    from layermoe.pipeline.recipe import run_recipe

    _call(run_recipe, ctx.obj, recipe)


@app.command("compare", epilog="Example: layermoe -w runs/cmp compare --budgets 36,54,72   (the demo model; or give a recipe)")
def compare_(
    ctx: typer.Context,
    recipe: Optional[Path] = typer.Argument(None, help="A recipe with a `compare:` section (default: recipes/compare.yaml, the demo)."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Comma-separated δ: run LayerMoE at each (e.g. 36,54,72)."),
) -> None:
    """LayerMoE vs NeuronMoE vs MoE-LPR vs a dense fine-tune on one generation: same data, steps and tokens."""
    from layermoe.pipeline.compare import run_compare_recipe

    try:
        values = [int(b) for b in _split(budgets)]
    except ValueError:
        err_console.print(f"[bold red]error:[/] --budgets takes whole numbers separated by commas, not {escape(repr(budgets))}",
                          soft_wrap=True, highlight=False, emoji=False)
        raise typer.Exit(2)
    _call(run_compare_recipe, ctx.obj, recipe, budgets=values or None)


@app.command(epilog="Example: layermoe demo -w /tmp/demo")
def demo(
    ctx: typer.Context,
    compare: bool = typer.Option(False, "--compare", help="Instead of the chain: LayerMoE (40% of the baseline's new experts), NeuronMoE, MoE-LPR and a dense fine-tune, side by side (= `layermoe compare`)."),
) -> None:
    """The whole chain on the embedded model and corpus, offline."""
    from layermoe.pipeline.recipe import run_demo

    _call(run_demo, ctx.obj, compare=compare)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
