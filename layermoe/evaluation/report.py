"""`<workdir>/report.md`: the one page to read after a run, drawn from the manifest alone.

Input is the manifest as a plain dict (`Manifest.model_dump(mode="json")`); every table and
figure comes from it, so the report can be rebuilt at any time without a model. Steps that
are pending, failed or missing show as such instead of breaking the page.

Figures this module draws (into the work dir): `bpb.png` (held-out bits per byte per
language, base model and after every generation) and, per generation with a routing record,
its routing figure (at the eval step's `outputs["routing_plot"]`, else `g<N>/routing.png`;
redrawn from the record, so it matches the eval step's own). Plots written by earlier steps (`outputs` entries ending in .png,
e.g. the similarity profile and the allocation) are embedded by their relative path when
the file exists.
"""

from __future__ import annotations

from pathlib import Path

from layermoe.core.numbers import signed
from layermoe.core.plotting import pyplot, save_figure
from layermoe.evaluation.groups import forgetting_and_gain, group_averages
from layermoe.evaluation.lm_eval import settings_of
from layermoe.evaluation.routing import plot_routing

REPORT_NAME = "report.md"
BPB_PLOT = "bpb.png"
STEPS = ("profile", "allocation", "expansion", "stage1", "stage2", "eval")


# --- reading the manifest dict ---------------------------------------------------------


def _generations(manifest: dict) -> list[dict]:
    return [g for g in (manifest.get("generations") or []) if isinstance(g, dict)]


def _step(generation: dict, name: str) -> dict:
    return generation.get(name) or {}


def _status(step: dict) -> str:
    return step.get("status") or "pending"


def _g0_languages(g0: dict) -> list[str]:
    return list(g0.get("new_languages") or g0.get("old_languages") or [])


def generation_of_language(manifest: dict) -> dict[str, int]:
    """0 for the base model's languages, g for those generation g added."""
    mapping: dict[str, int] = {}
    for position, generation in enumerate(_generations(manifest)):
        index = generation.get("index", position)
        languages = _g0_languages(generation) if index == 0 else generation.get("new_languages") or []
        for language in languages:
            mapping.setdefault(language, index)
    return mapping


def bpb_of(generation: dict) -> dict[str, float]:
    languages = _step(generation, "eval").get("languages") or {}
    return {lang: rec["bpb"] for lang, rec in languages.items() if isinstance(rec, dict) and rec.get("bpb") is not None}


# --- formatting ------------------------------------------------------------------------


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _count(value) -> str:
    return "—" if value is None else f"{value:,}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _image(workdir: Path, relative: str, alt: str) -> list[str]:
    if (workdir / relative).is_file():
        return [f"![{alt}]({relative})", ""]
    return [f"_{alt}: plot `{relative}` not found_", ""]


def _name(index: int) -> str:
    return "G0 (base)" if index == 0 else f"G{index}"


# --- sections --------------------------------------------------------------------------


def _lineage(manifest: dict) -> list[str]:
    lines = ["## Lineage", ""]
    base = manifest.get("base_model") or {}
    if base:
        facts = [f"`{base.get('spec', '?')}`", base.get("kind")]
        if base.get("model_type"):
            facts.append(base["model_type"])
        if base.get("num_layers"):
            facts.append(f"{base['num_layers']} layers")
        if base.get("num_parameters"):
            facts.append(f"{base['num_parameters']:,} parameters")
        lines.append("Base model: " + ", ".join(str(f) for f in facts if f) + ".")
        digests = base.get("sha256") or {}
        if isinstance(digests, dict) and digests:
            lines.append("SHA-256: " + ", ".join(f"`{name}` {digest[:12]}" for name, digest in sorted(digests.items())) + ".")
        elif isinstance(digests, str):
            lines.append(f"SHA-256: {digests[:12]}.")
        lines.append("")
    else:
        lines += ["_No base model recorded yet._", ""]
    rows = []
    for g in _generations(manifest):
        index = g.get("index", 0)
        if index == 0:
            statuses = ["—"] * (len(STEPS) - 1) + [_status(_step(g, "eval"))]
            rows.append([_name(0), "—", ", ".join(_g0_languages(g)) or "—", *statuses])
        else:
            statuses = [_status(_step(g, s)) for s in STEPS]
            rows.append([_name(index), ", ".join(g.get("old_languages") or []) or "—", ", ".join(g.get("new_languages") or []) or "—", *statuses])
    if rows:
        lines += _table(["Generation", "Old languages", "New languages", *STEPS], rows)
    return lines


def _parameters(manifest: dict, workdir: Path) -> list[str]:
    lines = ["## Experts and parameters added", ""]
    expansions = [g for g in _generations(manifest) if g.get("index", 0) >= 1]
    if not expansions:
        return lines + ["_No expansion generation yet._", ""]
    rows = []
    for g in expansions:
        alloc = _step(g, "allocation")
        if _status(alloc) != "done":
            rows.append([_name(g["index"]), f"_{_status(alloc)}_", "—", "—", "—", "—", "—", "—"])
            continue
        new_experts = alloc.get("new_experts_per_layer")
        added, uniform = alloc.get("new_parameters"), alloc.get("uniform_new_parameters")
        ratio = f"{added / uniform:.2f}×" if added is not None and uniform else "—"
        rows.append([
            _name(g["index"]),
            str(alloc.get("strategy") or "—"),
            _count(alloc.get("budget")),
            _count(sum(new_experts)) if new_experts else "—",
            ", ".join(str(i) for i in alloc.get("classifier_layers") or []) or "—",
            _count(added),
            _count(uniform),
            ratio,
        ])
    lines += _table(
        ["Generation", "Strategy", "Budget δ", "New experts", "Classifier layers", "New parameters", "Uniform (MoE-LPR), same budget", "Ratio"],
        rows,
    )
    for g in expansions:
        profile, alloc = _step(g, "profile"), _step(g, "allocation")
        lines += [f"### {_name(g['index'])}: layer similarity and allocation", ""]
        similarity = profile.get("similarity")
        if similarity:
            lines.append("Similarity S^i per layer (Eq. 9): " + ", ".join(f"{s:.3f}" for s in similarity) + ".")
        else:
            lines.append(f"_Profile {_status(profile)}._")
        neurons = profile.get("neuron_counts")
        if neurons:
            lines.append(f"Language-specific FFN neurons per layer (unique among each language's top "
                         f"{profile.get('neuron_top_n') or '?'}, NeuronMoE): " + ", ".join(str(n) for n in neurons) + ".")
        totals = alloc.get("experts_per_layer")
        if totals:
            how = "neuron strategy" if alloc.get("strategy") == "neuron" else "Eq. 10"
            lines.append(f"Experts per layer incl. expert 0 ({how}): " + ", ".join(str(n) for n in totals) + f" (Σ = {sum(totals)}).")
        sources = _step(g, "expansion").get("expert_sources")
        if _step(g, "expansion").get("expert_init") == "routed" and sources:
            lines.append("New experts copy expert (per layer, `--expert-init routed`): " + ", ".join(str(e) for e in sources) + ".")
        lines.append("")
        for step_name, step in (("similarity", profile), ("allocation", alloc)):
            for key, path in sorted((step.get("outputs") or {}).items()):
                if isinstance(path, str) and path.endswith(".png"):
                    lines += _image(workdir, path, f"{_name(g['index'])} {step_name} ({key})")
    return lines


def _bpb_columns(manifest: dict) -> list[tuple[str, dict[str, float], int]]:
    """(label, bpb by language, generation) for the base model and every evaluated generation."""
    columns = []
    for g in _generations(manifest):
        figures = bpb_of(g)
        if figures:
            index = g.get("index", 0)
            columns.append(("Base" if index == 0 else f"after G{index}", figures, index))
    return columns


def _bpb(manifest: dict, workdir: Path) -> list[str]:
    lines = ["## Held-out bits per byte (lower is better)", ""]
    columns = _bpb_columns(manifest)
    if not columns:
        return lines + ["_No evaluation yet: run `layermoe eval`._", ""]
    generation = generation_of_language(manifest)
    languages = sorted({lang for _, figures, _ in columns for lang in figures}, key=lambda l: (generation.get(l, 1 << 30), l))
    base = columns[0][1] if columns[0][2] == 0 else {}
    latest = columns[-1][1]
    header = ["Language", "Generation", *[label for label, _, _ in columns]]
    if base and columns[-1][2] != 0:
        header.append(f"Δ {columns[-1][0]} vs base")
    rows = []
    for lang in languages:
        row = [lang, f"G{generation[lang]}" if lang in generation else "?", *[_num(figures.get(lang)) for _, figures, _ in columns]]
        if len(header) > len(row):
            row.append(signed(latest[lang] - base[lang]) if lang in latest and lang in base else "—")
        rows.append(row)
    for g in sorted({generation[l] for l in languages if l in generation}):
        row = [f"**mean G{g}**", ""]
        for _, figures, _ in columns:
            known = {l: v for l, v in figures.items() if l in generation}
            row.append(_num(group_averages(known, generation, g)["by_generation"].get(g)))
        if len(header) > len(row):
            row.append("")
        rows.append(row)
    lines += _table(header, rows)
    lines += ["Bits per UTF-8 byte = next-token NLL (nats) / ln 2 / UTF-8 bytes of the scored text; each document "
              "starts with BOS (EOS where there is none) and every one of its tokens is scored.", ""]
    lines += _forgetting(manifest, generation, base)
    lines += _image(workdir, BPB_PLOT, "bits per byte per language")
    return lines


def _test_sets(manifest: dict) -> list[str]:
    """The user's own test sets (`eval --data LANG=SPEC`), each on its own row, every model that measured it."""
    columns = []
    for g in _generations(manifest):
        sets = _step(g, "eval").get("test_sets") or {}
        if sets:
            columns.append(("Base" if g.get("index", 0) == 0 else f"after G{g['index']}", sets, g.get("index", 0)))
    if not columns:
        return []
    generation = generation_of_language(manifest)
    names = sorted({name for _, sets, _ in columns for name in sets})
    base = columns[0][1] if columns[0][2] == 0 else {}
    latest = columns[-1][1]
    header = ["Test set", "Language", "Generation", "Documents", "Tokens", *[label for label, _, _ in columns]]
    if base and columns[-1][2] != 0:
        header.append(f"Δ {columns[-1][0]} vs base")
    rows = []
    for name in names:
        facts = next(sets[name] for _, sets, _ in reversed(columns) if name in sets)
        language = facts.get("language", "?")
        row = [name, language, "transfer" if facts.get("transfer") or language not in generation else f"G{generation[language]}",
               _count(facts.get("documents")), _count(facts.get("tokens")),
               *[_num((sets.get(name) or {}).get("bpb")) for _, sets, _ in columns]]
        if len(header) > len(row):
            row.append(signed(latest[name]["bpb"] - base[name]["bpb"]) if name in latest and name in base else "—")
        rows.append(row)
    lines = ["## Your test sets (bits per byte, lower is better)", "",
             "Each `eval --data LANG=SPEC`, evaluated in full (no token cap); transfer = a language no generation learned.", ""]
    return lines + _table(header, rows)


def _forgetting(manifest: dict, generation: dict[str, int], base: dict[str, float]) -> list[str]:
    rows = []
    previous = base
    for g in _generations(manifest):
        index = g.get("index", 0)
        after = bpb_of(g)
        if index == 0 or not after:
            continue
        known = {l: v for l, v in after.items() if l in generation}
        averages = group_averages(known, generation, index)
        base_averages = group_averages({l: v for l, v in base.items() if l in generation}, generation, index)
        change = forgetting_and_gain(known, base, generation, index) if base else {"forgetting": None, "gain": None}
        step = forgetting_and_gain(known, previous, generation, index) if previous else {"forgetting": None}
        rows.append([
            _name(index),
            f"{_num(base_averages['old_avg'])} → {_num(averages['old_avg'])}",
            f"{_num(base_averages['new_avg'])} → {_num(averages['new_avg'])}",
            signed(change["forgetting"]),
            signed(step["forgetting"]),
            signed(change["gain"]),
        ])
        previous = known
    if not rows:
        return []
    lines = ["Old-avg = mean over the languages of earlier generations (G0 included), New-avg = over the generation's own; "
             "forgetting = mean bpb rise on old languages (> 0 is worse) against the base model, and against the model "
             "before this generation; gain = mean bpb drop on new ones against the base model (> 0 is better).", ""]
    header = ["Generation", "Old-avg base → after", "New-avg base → after", "Forgetting vs base", "Forgetting vs previous", "Gain"]
    return lines + _table(header, rows)


def _extension_drift(manifest: dict) -> list[str]:
    """Earlier languages measured right before and right after each `extend` (before any training)."""
    lines = []
    for g in _generations(manifest):
        metrics = _step(g, "expansion").get("metrics") or {}
        drift = metrics.get("bpb_drift")
        if g.get("index", 0) < 2 or not drift:
            continue
        if not lines:
            lines = ["## Earlier languages when a generation opens", "",
                     "Bits per byte of every earlier language on the model before `extend` and on the extended, "
                     "untrained model (the new experts are copies of expert 0; their router rows decide the drift).", ""]
        before, after = metrics.get("bpb_before_extension", {}), metrics.get("bpb_after_extension", {})
        lines += [f"**{_name(g['index'])}** (router_init {(_step(g, 'expansion').get('config') or {}).get('router_init') or 'expert0'})", ""]
        lines += _table(["Language", "Before", "After", "Δ"],
                        [[lang, _num(before.get(lang)), _num(after.get(lang)), signed(d)] for lang, d in drift.items()])
    return lines


def _routing(manifest: dict, workdir: Path) -> list[str]:
    lines = ["## Routing health", ""]
    found = False
    for g in _generations(manifest):
        routing = _step(g, "eval").get("routing")
        if g.get("index", 0) == 0 or not isinstance(routing, dict) or not routing.get("layers"):
            continue
        found = True
        index = g["index"]
        layers = routing["layers"]
        tokens = routing.get("tokens") or {}
        lines += [f"### {_name(index)}", ""]
        if routing.get("classifier_routing", True):
            how = "Shares are of the effective routing: in classifier layers a token classified old goes to expert 0 alone."
        else:
            how = "The classifier does not decide routing in this model yet: shares are of the router alone."
        lines.append(f"Tokens routed: {', '.join(f'{l} {n:,}' for l, n in tokens.items()) or '—'}; top-{routing.get('top_k', '?')}. {how}")
        lines.append("")
        share = routing.get("expert0_share") or {}
        router_share = routing.get("router_expert0_share") or {}
        accuracy = routing.get("classifier_accuracy") or {}
        classifier_layers = routing.get("classifier_layers") or []
        experts = routing.get("experts_per_layer") or [None] * len(layers)
        rows = []
        for i, layer in enumerate(layers):
            c = classifier_layers.index(layer) if layer in classifier_layers else None
            rows.append([
                str(layer),
                _count(experts[i]) if i < len(experts) else "—",
                _pct(_at(share.get("old"), i)),
                _pct(_at(router_share.get("old"), i)),
                _pct(_at(share.get("new"), i)),
                _pct(_at(accuracy.get("old"), c)) if c is not None else "",
                _pct(_at(accuracy.get("new"), c)) if c is not None else "",
            ])
        lines += _table(
            ["Layer", "Experts", "Old → expert 0", "Old → expert 0 (router alone)", "New → expert 0", "Classifier acc. old", "Classifier acc. new"],
            rows,
        )
        lines += _image(workdir, routing_plot_path(g), f"{_name(index)} routing")
    if not found:
        lines += ["_No routing record yet (it comes with `layermoe eval` on an expanded model)._", ""]
    return lines


def routing_plot_path(generation: dict) -> str:
    """Where the routing figure of a generation lives: the eval step's own output, else g<N>/routing.png."""
    path = (_step(generation, "eval").get("outputs") or {}).get("routing_plot")
    return path if isinstance(path, str) and path.endswith(".png") else f"g{generation['index']}/routing.png"


def _at(values, i):
    if values is None or i is None or i >= len(values):
        return None
    return values[i]


def _benchmarks(manifest: dict) -> list[str]:
    columns = []
    for g in _generations(manifest):
        record = _step(g, "eval").get("lm_eval")
        if isinstance(record, dict) and record.get("results"):
            columns.append(("Base" if g.get("index", 0) == 0 else f"after G{g['index']}", record))
    if not columns:
        return []
    keys = []
    for _, record in columns:
        for task, metrics in record["results"].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric and (task, metric) not in keys:
                    keys.append((task, metric))

    def shots(record: dict, task: str) -> str:
        count = settings_of(record, task).get("num_fewshot")
        return "the task's own" if count is None else f"{count}-shot"

    rows = []
    for task, metric in keys:
        scored = [(record, (record["results"].get(task) or {}).get(metric)) for _, record in columns]
        counts = {shots(record, task) for record, value in scored if value is not None}
        # a row of one few-shot count says it once; otherwise each figure says its own
        cells = [_num(value) if value is None or len(counts) == 1 else f"{_num(value)} ({shots(record, task)})"
                 for record, value in scored]
        rows.append([task, metric.split(",")[0], counts.pop() if len(counts) == 1 else "varies", *cells])
    header = ["Task", "Metric", "Few-shot", *[label for label, _ in columns]]
    return ["## Benchmarks (lm-evaluation-harness)", ""] + _table(header, rows)


# --- figures ---------------------------------------------------------------------------


def plot_bpb(manifest: dict, path: Path) -> bool:
    """Grouped bars: bits per byte per language, one bar per model. False when there is nothing to draw."""
    columns = _bpb_columns(manifest)
    if not columns:
        return False
    import numpy as np

    plt = pyplot()

    generation = generation_of_language(manifest)
    languages = sorted({lang for _, figures, _ in columns for lang in figures}, key=lambda l: (generation.get(l, 1 << 30), l))
    x = np.arange(len(languages))
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(languages) * len(columns) ** 0.5 + 2), 4))
    for i, (label, figures, _) in enumerate(columns):
        values = [figures.get(lang, np.nan) for lang in languages]
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, [f"{lang}\nG{generation[lang]}" if lang in generation else lang for lang in languages])
    ax.set_ylabel("bits per UTF-8 byte (lower is better)")
    ax.set_title("Held-out bits per byte per language")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return True


def render_report(manifest: dict, workdir: Path) -> str:
    """Write `<workdir>/report.md` (and its figures) from the manifest dict; return the markdown."""

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plot_bpb(manifest, workdir / BPB_PLOT)
    for g in _generations(manifest):
        routing = _step(g, "eval").get("routing")
        if g.get("index", 0) >= 1 and isinstance(routing, dict) and routing.get("layers"):
            path = workdir / routing_plot_path(g)
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_routing(routing, path)
    head = ["# layermoe report", ""]
    stamp = [f"schema v{manifest['schema_version']}" if manifest.get("schema_version") else None,
             f"layermoe {manifest['tool_version']}" if manifest.get("tool_version") else None,
             f"updated {manifest['updated_at']}" if manifest.get("updated_at") else None]
    stamp = [s for s in stamp if s]
    if stamp:
        head += [f"_From manifest.json ({', '.join(stamp)})._", ""]
    lines = head + _lineage(manifest) + _parameters(manifest, workdir) + _bpb(manifest, workdir) + _test_sets(manifest) + _extension_drift(manifest) + _routing(manifest, workdir) + _benchmarks(manifest)
    text = "\n".join(lines).rstrip() + "\n"
    (workdir / REPORT_NAME).write_text(text, encoding="utf-8")
    return text
