"""Run a recipe's lineage, G1 then G2 ..., through one work dir: every step skipped when done.

So a killed run continues where it stopped (training resumes from its last checkpoint).
`layermoe run` and each variant of `layermoe compare` come through here.
"""

from __future__ import annotations

from layermoe.core.console import console, err_console
from layermoe.core.manifest import Generation, Manifest
from layermoe.core.workdir import StepAlreadyDone, Workdir
from layermoe.pipeline.allocate import allocate_generation
from layermoe.pipeline.evaluate import evaluate_generation
from layermoe.pipeline.expand import expand_generation
from layermoe.pipeline.extend import extend_generation
from layermoe.pipeline.options import ExtendOptions
from layermoe.pipeline.profile import new_manifest, profile_generation
from layermoe.pipeline.recipes import GenerationRecipe, Recipe
from layermoe.pipeline.train import train_generation


def _skip_done(step, *args) -> None:
    try:
        step(*args)
    except StepAlreadyDone as e:
        err_console.print(f"[green]✓[/] {e}")


def run_lineage(workdir: Workdir, recipe: Recipe) -> Manifest:
    """Every generation of `recipe` in an open session of `workdir`; returns the manifest."""
    first = recipe.generations[0]
    manifest = workdir.load() if workdir.has_manifest() else new_manifest(workdir, recipe.model, first.old, first.new)
    for number, spec in enumerate(recipe.generations, start=1):
        console.rule(f"[bold]G{number}: {', '.join(spec.new)}")
        if number == 1:
            generation = manifest.generations[1]
            device = {"device": recipe.device}
            _skip_done(profile_generation, workdir, manifest, generation,
                       spec.profile.model_copy(update={"data": spec.data_args(), **device}))
            _skip_done(allocate_generation, workdir, manifest, generation, spec.allocate)
            _skip_done(expand_generation, workdir, manifest, generation, spec.expand.model_copy(update=device))
        else:
            generation = _extended(workdir, manifest, number, spec, recipe.device)
        for stage, config in ((1, spec.stage1), (2, spec.stage2)):
            if config is not None:
                _skip_done(train_generation, workdir, manifest, generation, stage, config)
        if spec.eval is not None:
            evaluate_generation(workdir, manifest, generation, spec.eval.model_copy(update={"device": recipe.device}))
    return manifest


def _extended(workdir: Workdir, manifest: Manifest, number: int, spec: GenerationRecipe, device: str) -> Generation:
    """G(number) of the lineage: opened now, resumed where an extension stopped, or found done."""
    if len(manifest.generations) > number + 1:  # a later generation exists: this one is long done
        return manifest.generations[number]
    options = ExtendOptions(new=spec.new, data=spec.data_args(), device=device, profile=spec.profile,
                            allocate=spec.allocate, expand=spec.expand)
    try:
        return extend_generation(workdir, manifest, options)
    except StepAlreadyDone as done:
        err_console.print(f"[green]✓[/] {done}")
        return manifest.generations[number]
