"""`layermoe run RECIPE` and `layermoe demo`: every step of a lineage from one YAML file.

A recipe names the base model and one entry per generation; each step takes the options of
the command of the same name. Running a recipe again skips what is done, so a killed run
continues where it stopped (training resumes from its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layermoe_cli.console import console, err_console
from layermoe_cli.errors import LayermoeError
from layermoe_cli.manifest import Manifest
from layermoe_cli.workdir import StepAlreadyDone, Workdir, session

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
    return recipe


def _skip_done(step, *args, **kwargs) -> None:
    try:
        step(*args, **kwargs)
    except StepAlreadyDone as e:
        err_console.print(f"[green]✓[/] {e}")


def run_recipe(workdir: Workdir, recipe_path: str | Path) -> Manifest:
    recipe = load_recipe(recipe_path)
    if recipe.compare is not None:
        from layermoe_cli.pipeline.compare import run_compare

        run_compare(workdir, recipe)
        return None
    with session(workdir):
        return _run(workdir, recipe)


def _run(workdir: Workdir, recipe: Recipe) -> Manifest:
    from layermoe_cli.pipeline.allocate import allocate_generation
    from layermoe_cli.pipeline.evaluate import evaluate_generation
    from layermoe_cli.pipeline.expand import expand_generation
    from layermoe_cli.pipeline.profile import new_manifest, profile_generation
    from layermoe_cli.pipeline.train import train_generation
    from layermoe_cli.training.config import load_train_config

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
    from layermoe_cli.pipeline.extend import extend_generation

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


def _demo_summary(manifest: Manifest) -> None:
    from rich.table import Table

    table = Table(title="demo summary: held-out bits per byte (lower is better)", title_justify="left")
    for column in ("generation", "new experts", "Old-avg before → after", "New-avg before → after"):
        table.add_column(column, justify="left" if column == "generation" else "right")
    base = {lang: r.bpb for lang, r in manifest.generations[0].eval.languages.items()}
    for generation in manifest.generations[1:]:
        figures = {lang: r.bpb for lang, r in generation.eval.languages.items()}
        old = [lang for lang in generation.old_languages if lang in figures and lang in base]
        new = [lang for lang in generation.new_languages if lang in figures and lang in base]

        def avg(values):
            return sum(values) / len(values) if values else float("nan")

        table.add_row(
            f"G{generation.index} (+{', '.join(generation.new_languages)})",
            str(sum(generation.allocation.new_experts_per_layer or [])),
            f"{avg([base[x] for x in old]):.3f} → {avg([figures[x] for x in old]):.3f}",
            f"{avg([base[x] for x in new]):.3f} → {avg([figures[x] for x in new]):.3f}",
        )
    console.print(table)
    console.print("report: report.md in the work dir")
