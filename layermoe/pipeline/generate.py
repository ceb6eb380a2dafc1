"""`layermoe generate`: continue a prompt with a model of the lineage, streamed to the terminal;
with `--compare`, another model's continuation beside it (the quickest way to see a language
being learned). `demo` ends with the same view: one prompt per new language, base vs expanded.

Read-only: it reads the manifest (always whole: it is written atomically) and the checkpoints,
and writes nothing in the work dir, except that the first use of a GGUF base model converts it
into the cache (atomically, safe beside another process). So it takes no lock and runs while
`train` holds the work dir.
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.live import Live
from rich.table import Table
from rich.text import Text

from layermoe.core.console import console, err_console
from layermoe.core.devices import dtype_name, resolve_device, resolve_dtype, torch_dtype
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Manifest
from layermoe.core.workdir import Workdir
from layermoe.modeling.base import folder_position_limit, load_model, load_tokenizer, resolve_model_spec
from layermoe.modeling.generation import continue_text, continue_texts
from layermoe.pipeline.common import latest_checkpoint, require_open, texts_for
from layermoe.pipeline.eval_cache import ModelUnderTest
from layermoe.pipeline.evaluate import base_under_test, checkpoint_under_test
from layermoe.pipeline.options import GenerateOptions

MODEL_CHOICES = "base, current, gN (g0 = base) or a model folder / .gguf file"


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise LayermoeError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise LayermoeError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise LayermoeError(f"--top-p must be in (0, 1], got {top_p}")


def model_choice(workdir: Workdir, manifest: Manifest | None, choice: str, dtype: str = "float32") -> ModelUnderTest:
    """base | current | gN | PATH -> the model it names, to be loaded in `dtype` (nothing is loaded yet)."""
    numbered = re.fullmatch(r"[gG](\d+)", choice)
    if choice in ("base", "current") or numbered:
        if manifest is None:
            manifest = workdir.load()
        if choice == "base" or (numbered and int(numbered.group(1)) == 0):
            model = base_under_test(workdir, manifest, dtype)
            model.label = "base"
            return model
        generation = manifest.current if choice == "current" else None
        if numbered:
            index = int(numbered.group(1))
            if index >= len(manifest.generations):
                raise LayermoeError(f"--model {choice}: this work dir has no G{index} "
                                    f"(it has G0 to G{len(manifest.generations) - 1})")
            generation = manifest.generations[index]
        require_open(generation)
        checkpoint = latest_checkpoint(generation)
        if checkpoint is None:
            raise LayermoeError(f"--model {choice}: G{generation.index} has no model yet: run `layermoe expand` "
                                "(and train) first, or use --model base")
        model = checkpoint_under_test(workdir, manifest, checkpoint, dtype)
        model.label = f"G{generation.index} ({checkpoint})"
        return model
    path = Path(choice)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):

        source = resolve_model_spec(choice)
        return ModelUnderTest(choice, source, lambda device: load_model(source, device=device, dtype=torch_dtype(dtype),
                                                                        cache_dir=workdir.cache_dir / "models"), dtype=dtype)
    raise LayermoeError(f"--model {choice}: not {MODEL_CHOICES}")


def check_prompt_fits(model: ModelUnderTest, prompt: str, max_new_tokens: int) -> None:
    """Refuse, before anything is loaded or printed, a prompt and continuation longer than a model folder's positions.

    (A GGUF model's limit is known once it is converted: it is not checked here.)
    """
    if model.source.kind != "local":
        return
    limit = folder_position_limit(model.source.path)
    if limit is None:
        return
    if max_new_tokens >= limit:
        raise LayermoeError(f"--max-new-tokens {max_new_tokens:,} leaves no room for the prompt in the {limit:,} positions "
                            f"of {model.label}: give --max-new-tokens {limit - 1:,} or less")
    tokens = len(load_tokenizer(model.source.path)(prompt)["input_ids"])
    if tokens + max_new_tokens > limit:
        raise LayermoeError(f"the prompt ({tokens:,} tokens) and --max-new-tokens {max_new_tokens:,} are more than the "
                            f"{limit:,} positions of {model.label}: shorten the prompt or lower --max-new-tokens")


def run_generate(workdir: Workdir, options: GenerateOptions) -> None:
    """`layermoe generate`: dtype is the models' weights (auto: bfloat16 on CUDA, float32 on CPU)."""
    prompt, model, compare, device, dtype = options.prompt, options.model, options.compare, options.device, options.dtype
    max_new_tokens, temperature, top_p, seed = options.max_new_tokens, options.temperature, options.top_p, options.seed
    if not prompt.strip():
        raise LayermoeError("--prompt is empty: give the text to continue")
    check_sampling(max_new_tokens, temperature, top_p)
    device = resolve_device(device)
    dtype = dtype_name(resolve_dtype(dtype, device))
    manifest = workdir.load() if workdir.has_manifest() else None
    models = ([model_choice(workdir, manifest, compare, dtype)] if compare else []) + [model_choice(workdir, manifest, model, dtype)]
    for choice in models:
        check_prompt_fits(choice, prompt, max_new_tokens)
    how = "greedy" if temperature == 0 else f"sampled (temperature {temperature}, top-p {top_p}, seed {seed})"
    err_console.print(f"[dim]{how}, up to {max_new_tokens} new tokens, KV cache, {dtype} weights[/]", highlight=False)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if compare:
        side_by_side(models, [(None, prompt)], device, **sampling)
        return
    target = models[0]
    loaded, tokenizer = target.load(device)
    err_console.print(Text(f"{target.label}:", style="dim"), highlight=False)

    console.print(Text(prompt, style="bold"), end="")
    continue_text(loaded, tokenizer, prompt, **sampling,
                  on_text=lambda piece: console.print(piece, end="", markup=False, highlight=False))
    console.print()


def side_by_side(models: list[ModelUnderTest], prompts: list[tuple[str | None, str]], device: str, *,
                 max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 title: str | None = None, stream: bool = True) -> dict[tuple[int, int], str]:
    """One column per model, one row per (label, prompt); returns {(row, column): continuation}.

    stream: each cell fills as its tokens come (one prompt at a time); else every model
    continues all prompts in one batch and the table is shown once (cheaper: one decoding
    step serves every prompt). The models are loaded one at a time, so memory holds one.
    """

    labelled = any(label for label, _ in prompts)
    cells = {(row, col): "" for row in range(len(prompts)) for col in range(len(models))}
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def render() -> Table:
        table = Table(title=title, title_justify="left", show_lines=True, expand=True)
        if labelled:
            table.add_column("", no_wrap=True)
        table.add_column("prompt", style="bold", ratio=1)
        for model in models:
            table.add_column(Text(model.label), ratio=2)  # a path, not markup
        for row, (label, prompt) in enumerate(prompts):
            table.add_row(*([label or ""] if labelled else []), Text(prompt),
                          *[Text(cells[row, col]) for col in range(len(models))])
        return table

    if not stream:
        with err_console.status("generating"):
            for col, model in enumerate(models):
                loaded, tokenizer = model.load(device)
                for row, result in enumerate(continue_texts(loaded, tokenizer, [p for _, p in prompts], **sampling)):
                    cells[row, col] = result.text
                model.release()
        console.print(render())
        return cells
    with Live(render(), console=console, auto_refresh=False) as live:
        for col, model in enumerate(models):
            loaded, tokenizer = model.load(device)
            for row, (_, prompt) in enumerate(prompts):
                def on_text(piece: str, row=row, col=col) -> None:
                    cells[row, col] += piece
                    live.update(render(), refresh=True)

                continue_text(loaded, tokenizer, prompt, on_text=on_text, **sampling)
            model.release()
    if not console.is_terminal:
        console.print()  # Live ends its last frame with a newline only on a terminal
    return cells


def demo_prompt(text: str, words: int = 5) -> str:
    """The opening of a held-out document: its first few words (at most half of them)."""
    split = text.split()
    if len(split) >= 2:
        return " ".join(split[: max(1, min(words, len(split) // 2))])
    return text[: max(1, len(text) // 2)]


def show_new_languages(workdir: Workdir, manifest: Manifest, device: str = "auto", max_new_tokens: int = 16) -> dict:
    """One prompt per language the lineage added (the opening of a held-out document), base vs the newest model.

    Returns {(row, column): continuation} (rows in lineage order, column 0 = base), {} with nothing to show.
    """

    newest = manifest.generations[-1]
    checkpoint = latest_checkpoint(newest)
    if checkpoint is None:
        return {}
    prompts = []
    for generation in manifest.generations[1:]:
        for lang in generation.new_languages:
            texts = texts_for(workdir, generation, lang, "heldout", limit=1)
            if texts:
                prompts.append((f"{lang} (G{generation.index})", demo_prompt(texts[0])))
    if not prompts:
        return {}
    base = base_under_test(workdir, manifest)
    base.label = "base"
    expanded = checkpoint_under_test(workdir, manifest, checkpoint)
    expanded.label = f"G{newest.index} ({checkpoint})"
    return side_by_side([base, expanded], prompts, resolve_device(device), max_new_tokens=max_new_tokens, stream=False,
                        title=f"the new languages, greedy, {max_new_tokens} new tokens: base vs G{newest.index}")
