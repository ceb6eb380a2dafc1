"""`layermoe compare`'s outputs from its measurements: the table as data (compare.json), as text
(the Rich table, compare.md) and as a figure (compare.png)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from layermoe.core.manifest import Manifest
from layermoe.core.numbers import signed
from layermoe.core.plotting import pyplot, save_figure
from layermoe.core.workdir import atomic_write_text
from layermoe.pipeline.compare.plan import TITLES, CompareSpec


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(manifests: dict[str, Manifest], variants: list[dict], dense: dict, figures: dict, budgets: dict,
               spec: CompareSpec, max_tokens) -> dict:
    """The table as plain data (compare.json): one row per variant, in `variants` order, then the dense fine-tune."""
    generation = manifests[variants[0]["name"]].generations[1]
    old, new = list(generation.old_languages), list(generation.new_languages)
    base = figures["base"]
    base_old, base_new = _mean([base["bpb"][x] for x in old]), _mean([base["bpb"][x] for x in new])
    rows = []
    for name, title in [(v["name"], v["title"]) for v in variants] + [("dense", TITLES["dense"])]:
        bpb = figures[name]["bpb"]
        old_avg, new_avg = _mean([bpb[x] for x in old]), _mean([bpb[x] for x in new])
        budget = strategy = None
        if name == "dense":
            new_experts, per_layer = 0, None
            steps, tokens = [dense["steps"]], [dense["tokens_seen"]]
        else:
            g1 = manifests[name].generations[1]
            per_layer = list(g1.allocation.new_experts_per_layer)
            new_experts, budget = sum(per_layer), g1.allocation.budget
            strategy = g1.allocation.strategy if g1.allocation.strategy != "neuron" else f"neuron ({g1.allocation.neuron_mapping})"
            steps, tokens = [g1.stage1.steps, g1.stage2.steps], [g1.stage1.tokens_seen, g1.stage2.tokens_seen]
        rows.append({
            "variant": name,
            "title": title,
            "strategy": strategy,
            "budget": budget,
            "new_experts": new_experts,
            "new_experts_per_layer": per_layer,
            "total_parameters": figures[name]["total_parameters"],
            "trainable_parameters": figures[name]["trained_parameters"],
            "steps": steps,  # per stage
            "tokens_seen": tokens,
            "old_avg": old_avg,
            "new_avg": new_avg,
            "forgetting": old_avg - base_old,  # > 0: the old languages got worse
            "gain": base_new - new_avg,  # > 0: the new languages got better
            "bpb": bpb,
        })
    return {
        "old_languages": old,
        "new_languages": new,
        "max_tokens": max_tokens,
        "settings": {**spec.model_dump(), **budgets},
        "base": {"total_parameters": base["total_parameters"], "old_avg": base_old, "new_avg": base_new, "bpb": base["bpb"]},
        "variants": rows,
    }


def _cells(row: dict) -> list[str]:
    title = row.get("title") or TITLES.get(row["variant"], row["variant"])
    return [title, str(row["new_experts"]), f"{row['total_parameters']:,}", f"{row['trainable_parameters']:,}",
            " + ".join(str(s) for s in row["steps"]), f"{row['old_avg']:.4f}", f"{row['new_avg']:.4f}",
            signed(row["forgetting"]), signed(row["gain"])]


COLUMNS = ("variant", "new experts", "parameters", "trainable", "steps", "Old-avg bpb", "New-avg bpb", "forgetting", "gain")


def _caption(table: dict) -> str:
    base = table["base"]
    return (f"base model ({base['total_parameters']:,} parameters): Old-avg {base['old_avg']:.4f}, New-avg {base['new_avg']:.4f} "
            f"bits per byte on {', '.join(table['old_languages'])} / {', '.join(table['new_languages'])} "
            f"(≤ {table['max_tokens'] or 'all'} held-out tokens each). forgetting = Old-avg − base (> 0: worse); "
            "gain = base − New-avg (> 0: better). steps: stage 1 (+ stage 2), same stage-1 data and tokens for all.")


def _heading(table: dict) -> str:
    titles = [row.get("title") or TITLES.get(row["variant"], row["variant"]) for row in table["variants"]]
    return " vs ".join(titles)


def compare_table(table: dict) -> Table:
    rich_table = Table(title=f"{_heading(table)}: held-out bits per byte (lower is better)",
                       title_justify="left", caption=_caption(table), caption_justify="left")
    for column in COLUMNS:
        rich_table.add_column(column, justify="left" if column == "variant" else "right")
    for row in table["variants"]:
        rich_table.add_row(*_cells(row))
    return rich_table


def _settings_line(table: dict) -> str:
    settings = table["settings"]
    rows = {row["variant"]: row for row in table["variants"]}
    parts = [f"MoE-LPR: {settings['baseline_new_experts_per_layer']} new experts in every layer "
             f"({settings['baseline_new_experts']} in all)"]
    if settings.get("budgets"):
        parts.append("LayerMoE: Eq. 10 at δ = " + ", ".join(str(b) for b in sorted(set(settings["budgets"]))))
    else:
        parts.append(f"LayerMoE: {settings['layermoe_share']:g} of that, {settings['layermoe_new_experts']} new experts "
                     f"(δ = {settings['layermoe_budget']}), allocated by Eq. 10")
    neuron = rows.get("neuronmoe")
    if neuron is not None:
        if settings.get("neuron_mapping") == "linear":
            parts.append(f"NeuronMoE: the authors' linear mapping of the language-specific neuron counts "
                         f"({settings['neuron_min_experts']}–{settings['neuron_max_experts']} experts per layer), "
                         f"which reached δ = {neuron['budget']}")
        else:
            parts.append(f"NeuronMoE: experts proportional to each layer's language-specific neurons at δ = {neuron['budget']}")
    return "; ".join(parts) + "."


def compare_markdown(table: dict) -> str:
    lines = [f"# {_heading(table)}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in table["variants"]]
    lines += ["", _caption(table), "", _settings_line(table), "", "![gain and forgetting against trained parameters](compare.png)", ""]
    return "\n".join(lines)


def write_outputs(root: Path, table: dict) -> None:
    """compare.json, compare.md and compare.png in the work dir."""
    atomic_write_text(root / "compare.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(root / "compare.md", compare_markdown(table))
    plot_compare(table, root / "compare.png")


def compare_points(table: dict) -> list[tuple[str, int, float, float]]:
    """(title, trained parameters, New-avg gain, Old-avg forgetting) per variant of a compare table."""
    return [(row.get("title") or row["variant"], int(row["trainable_parameters"]), float(row["gain"]), float(row["forgetting"]))
            for row in table["variants"]]


def plot_compare(table: dict, path: str | Path) -> Path:
    """compare.png: gain on the new languages and forgetting of the old ones against trained parameters.

    One point per variant; parameters on a log axis (the dense fine-tune trains every weight).
    """
    plt = pyplot()
    points = compare_points(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    panels = (("New-avg gain (base − after, bits per byte)", 2, "higher is better"),
              ("Old-avg forgetting (after − base, bits per byte)", 3, "lower is better"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, column, hint) in zip(axes, panels):
        for k, point in enumerate(points):  # colours and a legend, not labels: close points would overlap
            ax.scatter(point[1], point[column], s=45, color=colors[k % len(colors)], zorder=3, label=point[0],
                       marker="os^Dv<>p"[k % 8])
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters")
        ax.set_ylabel(label)
        ax.set_title(hint, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{', '.join(table['new_languages'])} learned, {', '.join(table['old_languages'])} kept: "
                 "one point per variant", fontsize=10)
    return save_figure(fig, path)
