"""`layermoe status`: the lineage as a Rich table, or the manifest as JSON."""

from __future__ import annotations

import sys

from rich.table import Table

from layermoe.core.console import console
from layermoe.core.manifest import STEP_NAMES, Manifest, StepStatus
from layermoe.core.workdir import Workdir
from layermoe.pipeline.options import StatusOptions

_STYLE = {
    StepStatus.done: "[green]✓[/]",
    StepStatus.running: "[yellow]…[/]",
    StepStatus.failed: "[red]✗[/]",
    StepStatus.pending: "[dim]·[/]",
}
_SHORT = {"profile": "prof", "allocation": "alloc", "expansion": "exp", "prepare1": "data1", "stage1": "st1",
          "prepare2": "data2", "stage2": "st2", "eval": "eval"}


def _millions(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:,.0f}M" if n >= 1e8 else f"{n / 1e6:,.1f}M"


def show_status(workdir: Workdir, options: StatusOptions | None = None) -> None:
    """`layermoe status`: the lineage table, or (--json) the manifest."""
    manifest = workdir.load()  # reading needs no lock: the manifest is replaced atomically
    if options is not None and options.as_json:
        sys.stdout.write(manifest.to_json() + "\n")
        return
    console.print(lineage_table(manifest))
    for line in failed_steps(manifest):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def failed_steps(manifest: Manifest) -> list[str]:
    """One line per failed step, with what it recorded: the table's ✗ says which, this says why."""
    return [f"✗ G{generation.index} {name}: {generation.step(name).error or 'no reason recorded'}"
            for generation in manifest.generations if generation.index > 0 for name in STEP_NAMES
            if generation.step(name).status == StepStatus.failed]


def lineage_table(manifest: Manifest) -> Table:
    base = manifest.base_model
    title = f"layermoe {manifest.tool_version} — base: {base.spec if base else '?'}"
    if base and base.num_parameters:
        title += f" ({_millions(base.num_parameters)} parameters, {base.num_layers} layers)"
    table = Table(title=title, title_justify="left")
    table.add_column("gen", no_wrap=True)
    table.add_column("languages", no_wrap=True)
    table.add_column("steps", no_wrap=True)
    table.add_column("experts\n(new)", justify="right", no_wrap=True)
    table.add_column("params\ntotal / active", justify="right", no_wrap=True)
    table.add_column("added", justify="right", no_wrap=True)
    for generation in manifest.generations:
        if generation.index == 0:
            table.add_row("G0", ", ".join(generation.new_languages) + " (base)", "", "", "", "")
            continue
        alloc, exp = generation.allocation, generation.expansion
        experts = "—"
        if alloc.experts_per_layer:
            experts = f"{sum(alloc.experts_per_layer)} ({sum(alloc.new_experts_per_layer or [])})"
        params = "—"
        if exp.total_parameters:
            params = f"{_millions(exp.total_parameters)} / {_millions(exp.active_parameters)}"
        added = "—"
        if exp.added_parameters is not None and base and base.num_parameters:
            added = f"{_millions(exp.added_parameters)} (+{100 * exp.added_parameters / base.num_parameters:.0f}%)"
        table.add_row(
            f"G{generation.index}",
            "+ " + ", ".join(generation.new_languages),  # old = every earlier row
            "".join(_STYLE[generation.step(name).status] for name in STEP_NAMES),
            experts,
            params,
            added,
        )
    table.caption = ("steps: " + " ".join(_SHORT[name] for name in STEP_NAMES)
                     + " — ✓ done  … running  ✗ failed  · pending")
    return table
