"""`layermoe compare` / `layermoe demo --compare`: the papers' main table in miniature, for one
generation (G0 → G1).

Every variant sees the same training documents, the same stage-1 steps and tokens, and is
scored on the same held-out texts:

- LayerMoE: a layer-wise allocation (Eq. 10) with `layermoe_share` (40%) as many new experts
  as the baseline (or at each δ of `budgets`, `--budgets 36,54,72`), routing classifiers,
  stages 1 and 2;
- NeuronMoE: experts where the language-specific neurons are (`allocate --strategy neuron`),
  at LayerMoE's δ (proportional mapping) or with the authors' linear mapping, the same
  classifiers, stages 1 and 2;
- MoE-LPR: `baseline_new_experts_per_layer` new experts in every layer (its "3 experts per
  layer"), no classifier, stages 1 and 2;
- dense: a full fine-tune of the base model on the new languages, stage-1 settings (it has
  no router, so no stage 2).

Layout under the work dir: `compare/layermoe/` (`compare/layermoe-<δ>/` for the other budgets),
`compare/neuronmoe/` and `compare/moe-lpr/` are ordinary work dirs (manifest, resume, skipped
steps) driven by the recipe runner; `compare/dense/` holds the fine-tune and its `train.json`;
`compare/eval/<name>.json` caches each model's bits per byte; `compare.md`, `compare.json` hold
the table and `compare.png` plots gain and forgetting against trained parameters. A re-run
skips what is done.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table

from layermoe.core.console import console, err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Manifest, StepStatus
from layermoe.core.workdir import Workdir, atomic_write_text, session

TITLES = {"layermoe": "LayerMoE", "neuronmoe": "NeuronMoE", "moe-lpr": "MoE-LPR", "dense": "dense fine-tune"}
# What the comparison decides itself; a recipe that sets them would be silently overridden.
_ALLOCATE_KEYS_SET_HERE = ("budget", "new_experts", "strategy", "neuron_mapping", "min_experts", "max_experts")


class CompareSpec(BaseModel):
    """The `compare:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    baseline_new_experts_per_layer: int = Field(2, ge=1)  # MoE-LPR: 1 + 2 = 3 experts per layer
    layermoe_share: float = Field(0.4, gt=0, le=1)  # LayerMoE's new experts / the baseline's
    dense_learning_rate: float | None = Field(None, gt=0)  # None: stage 1's (steps and tokens stay stage 1's)
    budgets: list[int] | None = None  # LayerMoE at each δ instead of the share's (`--budgets 36,54,72`)
    neuron_mapping: Literal["proportional", "linear"] = "proportional"  # NeuronMoE: at LayerMoE's δ, or the authors'
    neuron_min_experts: int = Field(1, ge=1)  # linear mapping only
    neuron_max_experts: int = Field(6, ge=1)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def expert_budgets(num_layers: int, spec: CompareSpec) -> dict[str, int]:
    """New experts of each variant and LayerMoE's δ (which counts every layer's expert 0)."""
    baseline = num_layers * spec.baseline_new_experts_per_layer
    layermoe = round_half_up(spec.layermoe_share * baseline)
    if layermoe < 1:
        raise LayermoeError(f"layermoe_share {spec.layermoe_share} of {baseline} baseline experts rounds to 0 new experts: "
                            "raise compare.layermoe_share")
    delta = num_layers + layermoe
    assert delta >= num_layers  # Eq. 10 needs δ >= layers (expert 0 everywhere)
    return {"baseline_new_experts": baseline, "layermoe_new_experts": layermoe, "layermoe_budget": delta}


def plan_variants(num_layers: int, spec: CompareSpec, allocate: dict) -> list[dict]:
    """The MoE variants, in table order: name (its folder), title, and the allocate options of its run."""
    from layermoe.allocation.strategies import validate_budget, validate_linear_range

    budgets = expert_budgets(num_layers, spec)
    share = budgets["layermoe_budget"]
    layermoe_budgets = sorted(set(spec.budgets)) if spec.budgets else [share]
    for delta in layermoe_budgets:
        validate_budget(num_layers, delta)
    if spec.neuron_mapping == "linear":
        validate_linear_range(spec.neuron_min_experts, spec.neuron_max_experts)
    variants = []
    for delta in layermoe_budgets:
        variants.append({"name": "layermoe" if delta == share else f"layermoe-{delta}",
                         "title": "LayerMoE" if not spec.budgets else f"LayerMoE δ={delta}",
                         "allocate": {**allocate, "strategy": "layerwise", "budget": delta}})
    neuron = {**allocate, "strategy": "neuron", "neuron_mapping": spec.neuron_mapping}
    if spec.neuron_mapping == "linear":
        neuron.update(min_experts=spec.neuron_min_experts, max_experts=spec.neuron_max_experts)
    else:
        neuron["budget"] = share
    variants.append({"name": "neuronmoe", "title": TITLES["neuronmoe"], "allocate": neuron})
    # MoE-LPR routes with its LPR loss alone: no routing classifier
    variants.append({"name": "moe-lpr", "title": TITLES["moe-lpr"],
                     "allocate": {**allocate, "strategy": "uniform", "new_experts": budgets["baseline_new_experts"],
                                  "classifier_layers": 0}})
    return variants


# ---------------------------------------------------------------- entry points


def run_compare_recipe(workdir: Workdir, recipe_path: str | Path | None = None, budgets: list[int] | None = None) -> dict:
    """`layermoe compare [RECIPE] [--budgets ...]`: the shipped demo comparison unless a recipe is given."""
    from layermoe.pipeline.recipe import RECIPES_DIR, load_recipe

    recipe = load_recipe(recipe_path or RECIPES_DIR / "compare.yaml")
    if recipe.compare is None:
        raise LayermoeError(f"{recipe_path} has no `compare:` section: use `layermoe run` for an ordinary recipe")
    return run_compare(workdir, recipe, budgets=budgets)


def run_compare(workdir: Workdir, recipe, budgets: list[int] | None = None) -> dict:
    """Run (or resume) the variants of a recipe with a `compare:` section; print and write the table and plot."""
    from layermoe.training.config import load_train_config

    spec, generation_spec = _check_recipe(recipe)
    if budgets:
        spec = spec.model_copy(update={"budgets": list(budgets)})
    configs = {stage: load_train_config(None, stage=stage, **getattr(generation_spec, f"stage{stage}")) for stage in (1, 2)}
    dense_config = configs[1].model_copy(update={"learning_rate": spec.dense_learning_rate or configs[1].learning_rate})
    root = workdir.root / "compare"
    with workdir.lock():  # the sub work dirs have their own locks and rollback; this one keeps two runs apart
        shared_cache = root / "cache"
        num_layers = _base_num_layers(recipe.model, shared_cache)
        budgets_used = expert_budgets(num_layers, spec)
        variants = plan_variants(num_layers, spec, dict(generation_spec.allocate))
        manifests = {}
        for variant in variants:
            allocate = variant["allocate"]
            delta = allocate.get("budget", num_layers + allocate["new_experts"] if "new_experts" in allocate else None)
            console.rule(f"[bold]compare: {variant['title']}[/] ({allocate['strategy']}"
                         + (f", δ = {delta})" if delta is not None else ", linear mapping)"))
            manifests[variant["name"]] = _run_moe_variant(Workdir(root / variant["name"]), shared_cache, recipe,
                                                          generation_spec, allocate)
        console.rule(f"[bold]compare: {TITLES['dense']}")
        reference_name = variants[0]["name"]
        reference = Workdir(root / reference_name)  # its manifest records the data every variant reads
        dense = _run_dense(root / "dense", reference, manifests[reference_name], dense_config)
        console.rule("[bold]compare: held-out bits per byte")
        max_tokens = (generation_spec.eval or {}).get("max_tokens")
        figures = _evaluate_all(root, reference, manifests, dense, max_tokens, recipe.device)
        table = _summarise(manifests, variants, dense, figures, budgets_used, spec, max_tokens)
    _write_outputs(workdir.root, table)
    console.print(compare_table(table))
    err_console.print(f"wrote {workdir.root / 'compare.md'}, {workdir.root / 'compare.json'} and {workdir.root / 'compare.png'}")
    return table


def _check_recipe(recipe):
    try:
        spec = CompareSpec.model_validate(recipe.compare or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise LayermoeError(f"recipe `compare.{'.'.join(str(p) for p in first['loc'])}`: {first['msg']}")
    if len(recipe.generations) != 1:
        raise LayermoeError(f"a compare recipe has exactly one generation (G0 → G1), not {len(recipe.generations)}")
    generation = recipe.generations[0]
    fixed = [key for key in _ALLOCATE_KEYS_SET_HERE if key in generation.allocate]
    if fixed:
        raise LayermoeError(f"a compare recipe sets `allocate.{fixed[0]}` itself: remove it and use "
                            "compare.baseline_new_experts_per_layer / compare.layermoe_share / compare.budgets / "
                            "compare.neuron_mapping")
    if generation.stage1 is None or generation.stage2 is None:
        raise LayermoeError("a compare recipe needs both `stage1` and `stage2` (the dense variant uses stage1's settings)")
    extra = sorted(set(generation.eval or {}) - {"max_tokens"})
    if extra:
        raise LayermoeError(f"a compare recipe measures bits per byte only: `eval.{extra[0]}` is not supported here (keep max_tokens)")
    return spec, generation


def _base_num_layers(model: str, cache: Path) -> int:
    """The base model's layer count, read from its config (a GGUF is converted once, into the shared cache)."""
    from layermoe.modeling.base import gguf_checkpoint_dir, load_model, resolve_model_spec

    source = resolve_model_spec(model)
    if source.kind == "local":
        return int(json.loads((source.path / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    if source.kind == "gguf" and (gguf_checkpoint_dir(source, cache / "models") / "config.json").is_file():
        converted = gguf_checkpoint_dir(source, cache / "models")
        return int(json.loads((converted / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    loaded, _ = load_model(source, cache_dir=cache / "models")
    return int(loaded.config.num_hidden_layers)


# ---------------------------------------------------------------- the two MoE variants


def _run_moe_variant(workdir: Workdir, shared_cache: Path, recipe, generation_spec, allocate: dict) -> Manifest:
    """One G0 → G1 run of the recipe runner in its own work dir, with this variant's allocation."""
    from layermoe.pipeline.recipe import _run

    workdir.root.mkdir(parents=True, exist_ok=True)
    shared_cache.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(workdir.cache_dir):  # one converted base model and data cache for all variants
        # relative, so the work dir can move
        workdir.cache_dir.symlink_to(os.path.relpath(shared_cache, workdir.root), target_is_directory=True)
    if workdir.has_manifest():
        _check_same_allocation(workdir, workdir.load(), allocate)
    variant = recipe.model_copy(update={
        "compare": None,
        "generations": [generation_spec.model_copy(update={"allocate": allocate, "eval": None})],
    })
    with session(workdir):
        return _run(workdir, variant)


def _check_same_allocation(workdir: Workdir, manifest: Manifest, allocate: dict) -> None:
    record = manifest.generations[1].allocation
    if record.status != StepStatus.done:
        return
    num_layers = manifest.base_model.num_layers
    if "budget" in allocate or "new_experts" in allocate:
        wanted = allocate.get("budget") or num_layers + allocate["new_experts"]
    else:  # the linear neuron mapping: the budget is what it reaches
        wanted = record.budget
    same = record.strategy == allocate["strategy"] and record.budget == wanted
    if allocate["strategy"] == "neuron":
        same = same and record.neuron_mapping == allocate.get("neuron_mapping") and all(
            record.config.get(key) == allocate[key] for key in ("min_experts", "max_experts") if key in allocate)
    if not same:
        def name(strategy, mapping):
            return f"{strategy} ({mapping})" if strategy == "neuron" else strategy

        raise LayermoeError(f"{workdir.root} was allocated with {name(record.strategy, record.neuron_mapping)} δ = "
                            f"{record.budget}, not {name(allocate['strategy'], allocate.get('neuron_mapping'))} δ = {wanted}: "
                            "delete that folder to compare at the new settings")


# ---------------------------------------------------------------- the dense variant


def _run_dense(out: Path, reference: Workdir, manifest: Manifest, config) -> dict:
    """Fine-tune every weight of the base model on the new languages, with stage 1's settings and data."""
    from layermoe.pipeline.common import load_base
    from layermoe.training import train_stage

    record_path = out / "train.json"
    wanted = config.model_dump(mode="json")
    if record_path.is_file():
        done = json.loads(record_path.read_text(encoding="utf-8"))
        if done["config"] != wanted:
            raise LayermoeError(f"{out} was trained with other stage-1 settings: delete that folder to compare at the new ones")
        err_console.print("[green]✓[/] dense fine-tune is done already")
        return done

    generation = manifest.generations[1]
    base_dir = out / "base"  # the base model as a plain HF checkpoint (a GGUF base is converted)
    if not (base_dir / "config.json").is_file():
        model, tokenizer = load_base(reference, manifest, device="cpu")
        staging = out / "base.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(base_dir)
        del model
    # Stage 1's data through the data package, in the reference work dir's cache: the LayerMoE
    # variant prepared the same sources with the same tokenizer and settings, so it is found there.
    from transformers import AutoTokenizer

    from layermoe.data import Selection, prepare
    from layermoe.pipeline.prepare import prepared_root, stage_sources

    sources = {lang: s for lang, s in stage_sources(reference, generation).items() if lang in generation.new_languages}
    prepared = prepare(sources, manifest.generation_of_language(), 1, Selection.of(config),
                       AutoTokenizer.from_pretrained(base_dir), prepared_root(reference))
    result = train_stage(
        model_dir=base_dir,
        output_dir=out / "model",
        texts_by_language=None,
        prepared_dir=prepared.path,
        generation_of_language=manifest.generation_of_language(),
        current_generation=1,
        config=config,
        work_dir=out / "run",
        show_progress=True,
    )
    from layermoe.core.manifest import utc_now

    done = {
        "config": wanted,
        "checkpoint": "model",
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "trainable_parameters": result.trainable_parameters,
        "frozen_parameters": result.frozen_parameters,
        "final_losses": result.final_losses,
        "data": result.data,
        "finished_at": utc_now().isoformat(),
    }
    atomic_write_text(record_path, json.dumps(done, indent=2) + "\n")
    shutil.rmtree(base_dir, ignore_errors=True)  # the base model is in the cache already; this copy only fed training
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # resume points of a finished run
    return done


# ---------------------------------------------------------------- evaluation


def _evaluate_all(root: Path, reference: Workdir, manifests: dict[str, Manifest], dense: dict, max_tokens, device) -> dict:
    """Bits per byte of the base model and the three variants on one set of held-out texts (cached per model)."""
    from layermoe.core.devices import resolve_device
    from layermoe.pipeline.common import documents_for_tokens, load_base, load_recorded_checkpoint, texts_for

    device = resolve_device(device)
    manifest = reference.load()
    generation = manifest.generations[1]
    languages = list(generation.languages)
    texts = {}

    def held_out():
        if not texts:
            for lang in languages:
                texts[lang] = texts_for(reference, generation, lang, "heldout", limit=documents_for_tokens(max_tokens))
                if not texts[lang]:
                    raise LayermoeError(f"the held-out split of {lang} is empty: give it more documents with `data:`")
        return texts

    def load_dense():
        from layermoe.modeling.base import load_model, resolve_model_spec

        return load_model(resolve_model_spec(str(root / "dense" / "model")), device=device)

    jobs = {"base": (lambda: load_base(reference, manifest, device=device), "base model")}
    for name in manifests:
        record = manifests[name].generations[1].stage2
        load = (lambda name=name, record=record: load_recorded_checkpoint(Workdir(root / name), manifests[name],
                                                                            record.checkpoint, device=device))
        jobs[name] = (load, record.finished_at.isoformat())
    jobs["dense"] = (load_dense, dense["finished_at"])
    return {name: _measure(root / "eval" / f"{name}.json", name, load, trained, languages, max_tokens, held_out, device)
            for name, (load, trained) in jobs.items()}


def _measure(path: Path, name: str, load, trained: str, languages, max_tokens, held_out, device) -> dict:
    from layermoe.core.progress import token_progress
    from layermoe.evaluation import evaluate_languages

    key = {"model": name, "trained": trained, "languages": languages, "max_tokens": max_tokens}
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached["key"] == key:
            err_console.print(f"[green]✓[/] eval of {TITLES.get(name, name)} is up to date")
            return cached
    model, tokenizer = load()
    with token_progress(f"eval {name}") as update:
        results = evaluate_languages(model, tokenizer, held_out(), max_tokens=max_tokens, device=device, progress=update)
    figures = {"key": key, "bpb": {lang: r.bpb for lang, r in results.items()},
               "tokens": {lang: r.tokens for lang, r in results.items()}, **_parameter_counts(model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(figures, indent=2) + "\n")
    return figures


def _parameter_counts(model) -> dict:
    """All parameters, and those some stage trained: every one for a dense model; new experts, routers, classifiers for MoE."""
    total = sum(p.numel() for p in model.parameters())
    if getattr(model.config, "model_type", None) != "layermoe":
        return {"total_parameters": total, "trained_parameters": total}
    from layermoe.modeling import parameter_groups

    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    groups = parameter_groups(model)
    trained = sum(sizes[n] for g in ("experts_g1", "router", "classifier") for n in groups.get(g, []))
    return {"total_parameters": total, "trained_parameters": trained}


# ---------------------------------------------------------------- the table


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _summarise(manifests: dict[str, Manifest], variants: list[dict], dense: dict, figures: dict, budgets: dict,
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


def _signed(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4f}"  # no "-0.0000"


def _cells(row: dict) -> list[str]:
    title = row.get("title") or TITLES.get(row["variant"], row["variant"])
    return [title, str(row["new_experts"]), f"{row['total_parameters']:,}", f"{row['trainable_parameters']:,}",
            " + ".join(str(s) for s in row["steps"]), f"{row['old_avg']:.4f}", f"{row['new_avg']:.4f}",
            _signed(row["forgetting"]), _signed(row["gain"])]


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


def _write_outputs(root: Path, table: dict) -> None:
    from layermoe.profiling.plots import plot_compare

    atomic_write_text(root / "compare.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(root / "compare.md", compare_markdown(table))
    plot_compare(table, root / "compare.png")
