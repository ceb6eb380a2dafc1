"""`layermoe allocate`: how many experts each layer gets (Eq. 10, or a baseline)."""

from __future__ import annotations

from rich.table import Table

from layermoe.allocation import strategies as alloc
from layermoe.allocation.strategies import NEURON_LINEAR_DEFAULTS, NEURON_MAPPINGS, validate_linear_range
from layermoe.core.console import console, err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Generation, Manifest, StepStatus
from layermoe.core.workdir import Workdir, run_step, session
from layermoe.pipeline.options import AllocateOptions
from layermoe.profiling.plots import plot_allocation


def resolve_budget(budget: int | None, new_experts: int | None, num_layers: int) -> int:
    """δ counts every layer's expert 0: `--new-experts N` is `--budget N + layers`."""
    if (budget is None) == (new_experts is None):
        raise LayermoeError(f"give exactly one of --budget (δ, counting expert 0 of each of the {num_layers} layers) or --new-experts")
    return budget if budget is not None else new_experts + num_layers


def run_allocate(workdir: Workdir, options: AllocateOptions) -> None:
    """`layermoe allocate`: the allocation of the current generation."""
    with session(workdir):
        manifest = workdir.load()
        allocate_generation(workdir, manifest, manifest.current, options)


def check_neuron_settings(strategy, neuron_mapping, min_experts, max_experts, budget, new_experts, rounding,
                     max_per_layer) -> tuple[int, int]:
    """Check the neuron strategy's options; (min, max) experts of the linear mapping."""

    linear = strategy == "neuron" and neuron_mapping == "linear"
    if neuron_mapping not in NEURON_MAPPINGS:
        raise LayermoeError(f"unknown neuron mapping {neuron_mapping!r}: use proportional or linear")
    if neuron_mapping != "proportional" and strategy != "neuron":
        raise LayermoeError("--neuron-mapping belongs to --strategy neuron")
    if (min_experts is not None or max_experts is not None) and not linear:
        raise LayermoeError("--min-experts/--max-experts set the linear mapping: add --strategy neuron --neuron-mapping linear")
    if linear and (budget is not None or new_experts is not None):
        raise LayermoeError("the linear neuron mapping (the authors' formula) is not budget-bound: drop --budget/--new-experts "
                            "and set --min-experts/--max-experts; it reports the total it reaches")
    if linear and max_per_layer is not None:
        raise LayermoeError("the linear neuron mapping caps layers with --max-experts, not --max-per-layer")
    if strategy == "neuron" and rounding != "exact":
        raise LayermoeError("--rounding ceil is Eq. 10's literal formula: the neuron strategy always rounds exactly")
    low = NEURON_LINEAR_DEFAULTS[0] if min_experts is None else min_experts
    high = NEURON_LINEAR_DEFAULTS[1] if max_experts is None else max_experts
    if linear:
        validate_linear_range(low, high)
    return low, high


def allocate_generation(workdir: Workdir, manifest: Manifest, generation: Generation, options: AllocateOptions) -> None:
    budget, new_experts, strategy = options.budget, options.new_experts, options.strategy
    classifier_layers, rounding, max_per_layer = options.classifier_layers, options.rounding, options.max_per_layer
    seed, force, neuron_mapping = options.seed, options.force, options.neuron_mapping
    min_experts, max_experts = options.min_experts, options.max_experts

    num_layers = manifest.base_model.num_layers
    if rounding not in ("exact", "ceil"):
        raise LayermoeError(f"unknown rounding {rounding!r}: use exact or ceil")
    manual = manual_counts(manifest, generation, options)
    classifier_at = alloc.parse_layer_list(options.classifier_at, "--classifier-at")
    if manual is not None:
        strategy, budget, new_experts = "manual", sum(manual), None
    low, high = check_neuron_settings(strategy, neuron_mapping, min_experts, max_experts, budget, new_experts, rounding,
                                 max_per_layer)
    linear = strategy == "neuron" and neuron_mapping == "linear"
    budget = None if linear else resolve_budget(budget, new_experts, num_layers)
    if classifier_at is not None and classifier_layers is not None:
        raise LayermoeError("give --classifier-at (the layers) or --classifier-layers (how many of the most similar), not both")
    # LayerMoE puts routing classifiers on its K most similar layers; the uniform (MoE-LPR) baseline has none.
    if classifier_layers is None:
        classifier_layers = 0 if strategy == "uniform" else alloc.default_classifier_k(num_layers)
    k = len(classifier_at) if classifier_at is not None else classifier_layers
    alloc.validate_budget(num_layers, budget if budget is not None else num_layers, max_per_layer, k=k, strategy=strategy)
    profiled = generation.profile.status == StepStatus.done
    if strategy in ("layerwise", "neuron") and not profiled:
        raise LayermoeError(f"{strategy} allocation needs the {'similarity' if strategy == 'layerwise' else 'neuron'} "
                            f"profile of G{generation.index}: "
                            "run `layermoe profile` first (or use --strategy uniform|random)")
    if strategy == "neuron" and generation.profile.neuron_counts is None:
        raise LayermoeError(f"the profile of G{generation.index} has no neuron counts (an older layermoe, or --neuron-top-n 0): "
                            "redo it with `layermoe profile --force`")

    if manual is not None:
        alloc.allocate_manual(manual, num_layers, max_per_layer)  # checked now, before anything is written
    if classifier_at is not None:
        earlier = _earlier_new_experts(manifest, generation)
        if manual is not None:  # the model this generation builds is known already: check the placement now
            alloc.check_classifier_placement(classifier_at, [n + sum(e) for n, e in zip(manual, earlier)])
    config = dict(budget=budget, strategy=strategy, classifier_layers=k, rounding=rounding, max_per_layer=max_per_layer, seed=seed)
    if manual is not None:
        config["experts_per_layer"] = list(manual)
    if classifier_at is not None:
        config["classifier_at"] = list(classifier_at)
    if strategy == "neuron":
        config.update(neuron_mapping=neuron_mapping, **(dict(min_experts=low, max_experts=high) if linear else {}))
    with run_step(workdir, manifest, generation.allocation, f"allocation of G{generation.index}", config, force) as record:
        similarity = generation.profile.similarity if profiled else None
        if manual is not None:
            result = alloc.allocate_manual(manual, num_layers, max_per_layer)
        else:
            result = alloc.allocate(strategy, num_layers, budget, similarity, rounding=rounding,
                                    max_per_layer=max_per_layer, seed=seed, neuron_counts=generation.profile.neuron_counts,
                                    neuron_mapping=neuron_mapping, min_experts=low, max_experts=high)
        experts, overshoot = result.experts_per_layer, result.overshoot
        budget = result.total if linear else budget  # the linear mapping reports the total it reached
        record.strategy, record.budget, record.rounding, record.overshoot = strategy, budget, rounding, overshoot
        record.neuron_mapping = neuron_mapping if strategy == "neuron" else None
        record.experts_per_layer = list(experts)
        record.new_experts_per_layer = [n - 1 for n in experts]
        # Candidates: the MoE layers of the model this generation builds, i.e. with experts of this or an
        # earlier generation (a layer that got G1 experts but none now keeps its router and can keep a classifier).
        moe_after = [1 + n + sum(earlier) for n, earlier in zip(record.new_experts_per_layer, _earlier_new_experts(manifest, generation))]
        if classifier_at is not None:  # by hand: exactly these (a MoE layer each)
            record.classifier_layers = alloc.check_classifier_placement(classifier_at, moe_after)
        else:
            record.classifier_layers = alloc.classifier_layers(similarity, k, moe_after) if similarity is not None else []
        if classifier_at is None and similarity is not None and len(record.classifier_layers) < k:
            err_console.print(f"[yellow]note:[/] only {len(record.classifier_layers)} layers are MoE layers, so "
                              f"{len(record.classifier_layers)} classifiers instead of {k}", soft_wrap=True)
        base = manifest.base_model
        per_expert = 3 * base.hidden_size * base.intermediate_size
        record.new_parameters = alloc.new_parameter_count(experts, per_expert, base.hidden_size, record.classifier_layers)
        uniform = alloc.allocate_uniform(num_layers, budget).experts_per_layer
        record.uniform_new_parameters = alloc.new_parameter_count(uniform, per_expert, base.hidden_size, [])

        out = workdir.generation_dir(generation.index)
        out.mkdir(parents=True, exist_ok=True)

        plot_allocation(record.experts_per_layer, similarity, record.classifier_layers, out / "allocation.png",
                        uniform_reference=uniform,
                        neuron_counts=generation.profile.neuron_counts if strategy == "neuron" else None)
        record.outputs = {"plot": workdir.rel(out / "allocation.png")}
        console.print(allocation_table(manifest, generation))
        if linear:
            err_console.print(f"note: the linear neuron mapping (min {low}, max {high}) reached Σ N^i = {budget} "
                              f"({budget - num_layers} new experts); it is not budget-bound", soft_wrap=True)
        if overshoot:
            err_console.print(f"[yellow]note:[/] literal ceil (Eq. 10) gives Σ N^i = {sum(experts)}, {overshoot} over δ = {budget}", soft_wrap=True)


def manual_counts(manifest: Manifest, generation: Generation, options: AllocateOptions) -> list[int] | None:
    """This generation's per-layer totals (expert 0 included) given by hand, or None.

    `--experts-per-layer` is this generation's (1 + its new experts); `--total-experts-per-layer` each
    layer's experts after it, earlier generations' included (the authors' G2 lists), from which the
    new experts are what is added to what the model has."""
    given = alloc.parse_layer_list(options.experts_per_layer, "--experts-per-layer")
    totals = alloc.parse_layer_list(options.total_experts_per_layer, "--total-experts-per-layer")
    if given is not None and totals is not None:
        raise LayermoeError("give --experts-per-layer (this generation's) or --total-experts-per-layer (the model's), not both")
    if given is None and totals is None:
        if options.strategy == "manual":
            raise LayermoeError("--strategy manual takes its counts from --experts-per-layer 5,4,3,... (expert 0 included)")
        return None
    if "strategy" in options.model_fields_set and options.strategy != "manual":
        raise LayermoeError(f"--experts-per-layer gives the counts itself: drop --strategy {options.strategy}")
    if options.budget is not None or options.new_experts is not None:
        raise LayermoeError("--experts-per-layer gives the counts itself: drop --budget/--new-experts (δ is their sum)")
    if totals is None:
        return given
    earlier = [sum(row) for row in _earlier_new_experts(manifest, generation)]
    if len(totals) != len(earlier):
        raise LayermoeError(f"--total-experts-per-layer has {len(totals)} counts but the model has {len(earlier)} layers: "
                            "give one total per layer, every generation's experts and expert 0 included")
    fewer = [i for i, (t, e) in enumerate(zip(totals, earlier)) if t < 1 + e]
    if fewer:
        i = fewer[0]
        raise LayermoeError(f"--total-experts-per-layer gives layer {i} {totals[i]} experts, but it has {1 + earlier[i]} "
                            "already (expert 0 and the earlier generations'): a total counts every generation's experts")
    return [t - e for t, e in zip(totals, earlier)]


def _earlier_new_experts(manifest: Manifest, generation: Generation) -> list[list[int]]:
    """Per layer, the new experts each earlier generation (G1 .. G(g-1)) added."""
    layers = manifest.base_model.num_layers
    earlier = [g.allocation.new_experts_per_layer or [0] * layers for g in manifest.generations[1 : generation.index]]
    return [list(row) for row in zip(*earlier)] if earlier else [[] for _ in range(layers)]


def allocation_table(manifest: Manifest, generation: Generation) -> Table:
    record = generation.allocation
    base = manifest.base_model
    strategy = record.strategy if record.strategy != "neuron" else f"neuron, {record.neuron_mapping}"
    table = Table(title=f"G{generation.index} allocation ({strategy}, δ = {record.budget}): "
                        f"{sum(record.new_experts_per_layer)} new experts", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("S^i", justify="right")
    neurons = generation.profile.neuron_counts
    if neurons is not None:
        table.add_column("neurons", justify="right")
    table.add_column("experts N^i", justify="right")
    table.add_column("new", justify="right")
    table.add_column("classifier")
    similarity = generation.profile.similarity
    for i, n in enumerate(record.experts_per_layer):
        s = f"{similarity[i]:.4f}" if similarity else "—"
        counts = [f"{neurons[i]:,}"] if neurons is not None else []
        table.add_row(str(i), s, *counts, str(n), str(n - 1), "✓" if i in record.classifier_layers else "")
    share = f" = {100 * record.new_parameters / base.num_parameters:.1f}% of the base model" if base.num_parameters else ""
    uniform_share = (f" ({100 * record.uniform_new_parameters / base.num_parameters:.1f}%)" if base.num_parameters else "")
    table.caption = (f"new parameters: {record.new_parameters:,}{share}; "
                     f"uniform (MoE-LPR) at the same budget: {record.uniform_new_parameters:,}{uniform_share}")
    return table
