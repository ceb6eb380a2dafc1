"""`layermoe run RECIPE` and `layermoe demo`: every step of a lineage from one YAML file.

The recipe's schema is `pipeline/recipes.py`; its lineage runs through `pipeline/lineage.py`,
and a recipe with a `compare:` section through `pipeline/compare/`. Running a recipe again skips
what is done, so a killed run continues where it stopped (training resumes from its last checkpoint).
"""

from __future__ import annotations

from rich.table import Table

from layermoe.core.console import console
from layermoe.core.manifest import Manifest
from layermoe.core.numbers import signed
from layermoe.core.workdir import Workdir, session
from layermoe.evaluation.groups import forgetting_and_gain
from layermoe.pipeline.compare.run import run_compare
from layermoe.pipeline.generate import show_new_languages
from layermoe.pipeline.lineage import run_lineage
from layermoe.pipeline.options import DemoOptions, RunOptions
from layermoe.pipeline.recipes import load_recipe


def run_recipe(workdir: Workdir, options: RunOptions) -> Manifest | None:
    """`layermoe run RECIPE` (a path or a shipped recipe's name); a compare recipe runs its comparison."""
    recipe = load_recipe(options.recipe)
    if recipe.compare is not None:
        run_compare(workdir, recipe)
        return None
    with session(workdir):
        return run_lineage(workdir, recipe)


def run_demo(workdir: Workdir, options: DemoOptions | None = None) -> None:
    """The embedded chain: SmolLM2-135M (GGUF) and the builtin corpus, G0 = en → G1 → G2."""
    if options is not None and options.compare:  # LayerMoE vs NeuronMoE vs MoE-LPR vs a dense fine-tune on G0 → G1
        run_recipe(workdir, RunOptions(recipe="compare"))
        return
    manifest = run_recipe(workdir, RunOptions(recipe="demo"))
    _demo_summary(manifest)
    show_new_languages(workdir, manifest, device=load_recipe("demo").device)  # read-only: after the lock is let go


def _demo_summary(manifest: Manifest) -> None:
    """One row per generation. Forgetting is measured against the model before the generation (G1: the
    base model; G2: G1's), as report.md does: against the base, G2's old languages would mix in G1's gain."""
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

        forgetting = forgetting_and_gain(figures, before, known, generation.index)["forgetting"] if figures else None
        gain = forgetting_and_gain(figures, base, known, generation.index)["gain"] if figures else None
        table.add_row(
            f"G{generation.index} (+{', '.join(generation.new_languages)})",
            str(sum(generation.allocation.new_experts_per_layer or [])),
            f"{avg([before[x] for x in old]):.3f} → {avg([figures[x] for x in old]):.3f}",
            signed(forgetting, 3),
            f"{avg([base[x] for x in new]):.3f} → {avg([figures[x] for x in new]):.3f}",
            signed(gain, 3),
        )
        before = figures or before
    console.print(table)
    console.print("report: report.md in the work dir")
