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


def bytes_per_token(figures: dict, languages: list[str]) -> float | None:
    """Held-out UTF-8 bytes per scored token over `languages` (pooled), None for figures without bytes."""
    if "bytes" not in figures:
        return None
    return sum(figures["bytes"][x] for x in languages) / max(sum(figures["tokens"][x] for x in languages), 1)


def _speeds(name: str, manifests: dict[str, Manifest], figures: dict, new: list[str]) -> dict:
    """A vocabulary comparison's speeds: stage 1's training text in bytes per second of its wall time
    (tokens seen × the new languages' bytes per token), and generated characters per second."""
    per_token = bytes_per_token(figures, new)
    speeds = {"train_bytes_per_second": None, "generation_characters_per_second": None}
    if name != "dense" and per_token is not None:
        stage1 = manifests[name].generations[1].stage1
        if stage1.started_at and stage1.finished_at and stage1.tokens_seen:
            seconds = (stage1.finished_at - stage1.started_at).total_seconds()
            speeds["train_bytes_per_second"] = stage1.tokens_seen * per_token / max(seconds, 1e-9)
    generation = figures.get("generation")
    if generation:
        speeds["generation_characters_per_second"] = _mean([g["characters_per_second"] for g in generation.values()])
    return speeds


def summarise(manifests: dict[str, Manifest], variants: list[dict], dense: dict | None, figures: dict, budgets: dict,
               spec: CompareSpec, max_tokens) -> dict:
    """The table as plain data (compare.json): one row per variant, in `variants` order, then the dense fine-tune
    (when it ran). With a vocabulary variant, each row also has bytes per token and the speeds."""
    generation = manifests[variants[0]["name"]].generations[1]
    old, new = list(generation.old_languages), list(generation.new_languages)
    base = figures["base"]
    base_old, base_new = _mean([base["bpb"][x] for x in old]), _mean([base["bpb"][x] for x in new])
    vocabulary = any("expand" in v for v in variants)
    rows = []
    names = [(v["name"], v["title"]) for v in variants] + ([("dense", TITLES["dense"])] if dense is not None else [])
    for name, title in names:
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
        if vocabulary:
            rows[-1].update(bytes_per_token={x: bytes_per_token(figures[name], [x]) for x in old + new},
                            new_bytes_per_token=bytes_per_token(figures[name], new),
                            **_speeds(name, manifests, figures[name], new))
    base_row = {"total_parameters": base["total_parameters"], "old_avg": base_old, "new_avg": base_new, "bpb": base["bpb"]}
    if vocabulary:
        base_row.update(bytes_per_token={x: bytes_per_token(base, [x]) for x in old + new},
                        new_bytes_per_token=bytes_per_token(base, new))
    return {
        "old_languages": old,
        "new_languages": new,
        "max_tokens": max_tokens,
        "settings": {**spec.model_dump(), **budgets},
        "equal_text": vocabulary,
        "base": base_row,
        "variants": rows,
    }


def _number(value, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _cells(row: dict, vocabulary: bool = False) -> list[str]:
    title = row.get("title") or TITLES.get(row["variant"], row["variant"])
    cells = [title, str(row["new_experts"]), f"{row['total_parameters']:,}", f"{row['trainable_parameters']:,}",
             " + ".join(str(s) for s in row["steps"]), f"{row['old_avg']:.4f}", f"{row['new_avg']:.4f}",
             signed(row["forgetting"]), signed(row["gain"])]
    if vocabulary:
        cells += [_number(row.get("new_bytes_per_token"), 2), _number(row.get("train_bytes_per_second")),
                  _number(row.get("generation_characters_per_second"), 1)]
    return cells


COLUMNS = ("variant", "new experts", "parameters", "trainable", "steps", "Old-avg bpb", "New-avg bpb", "forgetting", "gain")
# With a vocabulary variant: the new languages' bytes per token, stage 1's training text per second, generation speed
VOCABULARY_COLUMNS = ("New bytes/token", "train bytes/s", "gen chars/s")


def _columns(table: dict) -> tuple[str, ...]:
    return COLUMNS + (VOCABULARY_COLUMNS if table.get("equal_text") else ())


def _caption(table: dict) -> str:
    base = table["base"]
    return (f"base model ({base['total_parameters']:,} parameters): Old-avg {base['old_avg']:.4f}, New-avg {base['new_avg']:.4f} "
            f"bits per byte on {', '.join(table['old_languages'])} / {', '.join(table['new_languages'])} "
            + (f"(the same held-out text for every model: what ≤ {table['max_tokens'] or 'all'} base-tokenizer tokens cover). "
               if table.get("equal_text") else f"(≤ {table['max_tokens'] or 'all'} held-out tokens each). ")
            + "forgetting = Old-avg − base (> 0: worse); "
            "gain = base − New-avg (> 0: better). steps: stage 1 (+ stage 2), same stage-1 data and tokens for all.")


def _heading(table: dict) -> str:
    titles = [row.get("title") or TITLES.get(row["variant"], row["variant"]) for row in table["variants"]]
    return " vs ".join(titles)


def compare_table(table: dict) -> Table:
    rich_table = Table(title=f"{_heading(table)}: held-out bits per byte (lower is better)",
                       title_justify="left", caption=_caption(table), caption_justify="left")
    for column in _columns(table):
        rich_table.add_column(column, justify="left" if column == "variant" else "right")
    for row in table["variants"]:
        rich_table.add_row(*_cells(row, table.get("equal_text", False)))
    return rich_table


def vocabulary_markdown(table: dict) -> list[str]:
    """Bytes per token per language, the base tokenizer's beside the vocabulary variant's (markdown rows)."""
    rows = {row["variant"]: row for row in table["variants"]}
    vocab = rows.get("layermoe-vocab")
    if vocab is None:
        return []
    base = table["base"]["bytes_per_token"]
    lines = ["| language | bytes/token, base tokenizer | with the new vocabulary | ratio |", "|---|---:|---:|---:|"]
    for lang in table["old_languages"] + table["new_languages"]:
        before, after = base[lang], vocab["bytes_per_token"][lang]
        lines.append(f"| {lang}{' (old)' if lang in table['old_languages'] else ''} | {before:.2f} | {after:.2f} | "
                     f"{after / before:.2f}× |")
    return lines + [""]


def _settings_line(table: dict) -> str:
    settings = table["settings"]
    rows = {row["variant"]: row for row in table["variants"]}
    parts = [f"MoE-LPR: {settings['baseline_new_experts_per_layer']} new experts in every layer "
             f"({settings['baseline_new_experts']} in all)"] if "moe-lpr" in rows else []
    if settings.get("budgets"):
        parts.append("LayerMoE: Eq. 10 at δ = " + ", ".join(str(b) for b in sorted(set(settings["budgets"]))))
    else:
        parts.append(f"LayerMoE: {settings['layermoe_share']:g} of "
                     + ("that" if "moe-lpr" in rows else f"MoE-LPR's {settings['baseline_new_experts']}")
                     + f", {settings['layermoe_new_experts']} new experts "
                     f"(δ = {settings['layermoe_budget']}), allocated by Eq. 10")
    if "layermoe-vocab" in rows:
        parts.append(f"LayerMoE + vocabulary: the same δ and steps, with up to {settings['vocabulary_new_tokens']:,} new "
                     "tokens learned from the new languages' training text (`expand --new-tokens`)")
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
    columns = _columns(table)
    lines = [f"# {_heading(table)}", "", "| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(row, table.get("equal_text", False))) + " |" for row in table["variants"]]
    lines += ["", _caption(table), ""] + vocabulary_markdown(table) + [_settings_line(table), "", "![gain and forgetting against trained parameters](compare.png)", ""]
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
