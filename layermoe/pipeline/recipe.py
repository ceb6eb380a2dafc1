"""`layermoe run RECIPE` and `layermoe demo`: every step of a lineage from one YAML file.

A recipe names the base model and one entry per generation; each step takes the options of
the command of the same name. Running a recipe again skips what is done, so a killed run
continues where it stopped (training resumes from its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layermoe.core.console import console, err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Manifest
from layermoe.core.workdir import StepAlreadyDone, Workdir, session

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class GenerationRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    old: list[str] | None = None  # the first generation only: the base model's languages (G0)
    new: list[str]
    data: dict[str, str] = Field(default_factory=dict)
    profile: dict[str, Any] = Field(default_factory=dict)  # tokens, batch_tokens, seed, include_bos
    allocate: dict[str, Any] = Field(default_factory=dict)  # budget | new_experts, strategy, classifier_layers, ...
    expand: dict[str, Any] = Field(default_factory=dict)  # top_k, classifier_granularity (G1); router_init, classifier (G2+)
    stage1: dict[str, Any] | None = Field(default_factory=dict)  # TrainConfig fields; null skips the stage
    stage2: dict[str, Any] | None = Field(default_factory=dict)
    eval: dict[str, Any] | None = Field(default_factory=dict)  # max_tokens, tasks, num_fewshot, limit


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "recipe"
    model: str
    device: str = "auto"
    generations: list[GenerationRecipe]
    compare: dict[str, Any] | None = None  # LayerMoE vs NeuronMoE vs MoE-LPR vs dense on one generation (pipeline/compare.py)


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LayermoeError(f"recipe not found: {path} (the shipped ones are in {RECIPES_DIR})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LayermoeError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise LayermoeError(f"recipe {path}: `{where}`: {first['msg']}")
    if not recipe.generations or not recipe.generations[0].old:
        raise LayermoeError(f"recipe {path}: the first generation needs `old:` (the base model's languages)")
    _check_step_options(path, recipe)
    return recipe


def _options_of(function, *given: str) -> set[str]:
    """The keyword options of a step function that a recipe may set (not those the runner passes itself)."""
    import inspect

    parameters = inspect.signature(function).parameters
    return {name for name, p in parameters.items() if p.kind == p.KEYWORD_ONLY} - set(given)


def _check_step_options(path: Path, recipe: Recipe) -> None:
    """Every option of every step names a real option of that step: checked before anything runs."""
    from layermoe.pipeline.allocate import allocate_generation
    from layermoe.pipeline.evaluate import evaluate_generation
    from layermoe.pipeline.expand import expand_generation
    from layermoe.pipeline.extend import extend_generation
    from layermoe.pipeline.profile import profile_generation
    from layermoe.training.config import load_train_config

    first = {"profile": _options_of(profile_generation, "data", "device"),
             "allocate": _options_of(allocate_generation),
             "expand": _options_of(expand_generation, "device")}
    later = _options_of(extend_generation, "new", "data", "device")  # profile, allocate and expand go to `extend`
    evaluate = _options_of(evaluate_generation, "device")
    for number, spec in enumerate(recipe.generations):
        sections = {name: (getattr(spec, name), first[name] if number == 0 else later) for name in first}
        sections["eval"] = (spec.eval, evaluate)
        for name, (options, allowed) in sections.items():
            unknown = sorted(set(options or {}) - allowed)
            if unknown:
                raise LayermoeError(f"recipe {path}: `generations.{number}.{name}` has no option {unknown[0]!r} "
                                    f"(it takes {', '.join(sorted(allowed))})")
        for stage in (1, 2):
            options = getattr(spec, f"stage{stage}")
            if options is not None:
                try:
                    load_train_config(None, stage=stage, **options)
                except LayermoeError as e:
                    raise LayermoeError(f"recipe {path}: `generations.{number}.stage{stage}`: {e}") from None


def _skip_done(step, *args, **kwargs) -> None:
    try:
        step(*args, **kwargs)
    except StepAlreadyDone as e:
        err_console.print(f"[green]✓[/] {e}")


def run_recipe(workdir: Workdir, recipe_path: str | Path) -> Manifest:
    recipe = load_recipe(recipe_path)
    if recipe.compare is not None:
        from layermoe.pipeline.compare import run_compare

        run_compare(workdir, recipe)
        return None
    with session(workdir):
        return _run(workdir, recipe)


def _run(workdir: Workdir, recipe: Recipe) -> Manifest:
    from layermoe.pipeline.allocate import allocate_generation
    from layermoe.pipeline.evaluate import evaluate_generation
    from layermoe.pipeline.expand import expand_generation
    from layermoe.pipeline.profile import new_manifest, profile_generation
    from layermoe.pipeline.train import train_generation
    from layermoe.training.config import load_train_config

    manifest = workdir.load() if workdir.has_manifest() else new_manifest(workdir, recipe.model, recipe.generations[0].old,
                                                                          recipe.generations[0].new)
    for number, spec in enumerate(recipe.generations, start=1):
        console.rule(f"[bold]G{number}: {', '.join(spec.new)}")
        if number == 1:
            generation = manifest.generations[1]
            _skip_done(profile_generation, workdir, manifest, generation, data=list(_data_args(spec)),
                       device=recipe.device, **spec.profile)
            _skip_done(allocate_generation, workdir, manifest, generation, **spec.allocate)
            _skip_done(expand_generation, workdir, manifest, generation, device=recipe.device, **spec.expand)
        else:
            generation = _extended(workdir, manifest, number, spec, recipe.device)
        for stage, options in ((1, spec.stage1), (2, spec.stage2)):
            if options is not None:
                _skip_done(train_generation, workdir, manifest, generation, stage, load_train_config(None, stage=stage, **options))
        if spec.eval is not None:
            evaluate_generation(workdir, manifest, generation, device=recipe.device, **spec.eval)
    return manifest


def _extended(workdir: Workdir, manifest: Manifest, number: int, spec: GenerationRecipe, device: str):
    """G(number) of the lineage: opened now, resumed where an extension stopped, or found done."""
    from layermoe.pipeline.extend import extend_generation

    if len(manifest.generations) > number + 1:  # a later generation exists: this one is long done
        return manifest.generations[number]
    try:
        return extend_generation(workdir, manifest, new=spec.new, data=list(_data_args(spec)), device=device,
                                 **spec.profile, **spec.allocate, **spec.expand)
    except StepAlreadyDone as done:
        err_console.print(f"[green]✓[/] {done}")
        return manifest.generations[number]


def _data_args(spec: GenerationRecipe):
    return (f"{lang}={source}" for lang, source in spec.data.items())


def run_demo(workdir: Workdir, compare: bool = False) -> None:
    """The embedded chain: SmolLM2-135M (GGUF) and the builtin corpus, G0 = en → G1 → G2."""
    name = "compare.yaml" if compare else "demo.yaml"
    recipe = RECIPES_DIR / name
    if not recipe.is_file():  # installed without the source tree: the recipe travels with the package
        recipe = Path(__file__).resolve().parent.parent / "recipes" / name
    if compare:  # LayerMoE vs NeuronMoE vs MoE-LPR vs a dense fine-tune on G0 → G1 (pipeline/compare.py)
        run_recipe(workdir, recipe)
        return
    manifest = run_recipe(workdir, recipe)
    _demo_summary(manifest)
    from layermoe.pipeline.generate import show_new_languages

    show_new_languages(workdir, manifest, device=load_recipe(recipe).device)  # read-only: after the lock is let go


def _demo_summary(manifest: Manifest) -> None:
    """One row per generation. Forgetting is measured against the model before the generation (G1: the
    base model; G2: G1's), as report.md does: against the base, G2's old languages would mix in G1's gain."""
    from rich.table import Table

    from layermoe.evaluation import forgetting_and_gain

    table = Table(title="demo summary: held-out bits per byte (lower is better)", title_justify="left")
    for column in ("generation", "new experts", "Old-avg before → after", "forgetting", "New-avg base → after", "gain"):
        table.add_column(column, justify="left" if column == "generation" else "right")
    known = manifest.generation_of_language()
    base = {lang: r.bpb for lang, r in manifest.generations[0].eval.languages.items()}
    before = base  # the model before the generation
    for generation in manifest.generations[1:]:
        figures = {lang: r.bpb for lang, r in generation.eval.languages.items()}
        old = [lang for lang in generation.old_languages if lang in figures and lang in before]
        new = [lang for lang in generation.new_languages if lang in figures and lang in base]

        def avg(values):
            return sum(values) / len(values) if values else float("nan")

        def signed(value):
            return "—" if value is None else f"{round(value, 3) + 0.0:+.3f}"

        forgetting = forgetting_and_gain(figures, before, known, generation.index)["forgetting"] if figures else None
        gain = forgetting_and_gain(figures, base, known, generation.index)["gain"] if figures else None
        table.add_row(
            f"G{generation.index} (+{', '.join(generation.new_languages)})",
            str(sum(generation.allocation.new_experts_per_layer or [])),
            f"{avg([before[x] for x in old]):.3f} → {avg([figures[x] for x in old]):.3f}",
            signed(forgetting),
            f"{avg([base[x] for x in new]):.3f} → {avg([figures[x] for x in new]):.3f}",
            signed(gain),
        )
        before = figures or before
    console.print(table)
    console.print("report: report.md in the work dir")
