"""`layermoe extend`: open the next generation (lifelong expansion, G(n) → G(n+1)).

Profile the current expanded model (its HSA is the MoE block's input), allocate a new group
of experts per layer, append them as copies of expert 0 (or, with `--expert-init routed`, of
the expert the new languages' tokens are routed to most) with every earlier expert frozen,
and measure right away how much the earlier languages moved (they should not, much).
"""

from __future__ import annotations

from contextlib import contextmanager

from layermoe.allocation import strategies as alloc
from layermoe.core.console import err_console
from layermoe.core.devices import resolve_device
from layermoe.core.errors import LayermoeError, StoppedWithWorkKept
from layermoe.core.manifest import Generation, Manifest, StepStatus, utc_now
from layermoe.core.workdir import StepAlreadyDone, Workdir, session
from layermoe.data.languages import validate_language_group
from layermoe.modeling import ROUTER_INITS
from layermoe.pipeline.allocate import allocate_generation, check_neuron_settings, manual_counts, resolve_budget
from layermoe.pipeline.common import latest_checkpoint, stopped_extension
from layermoe.pipeline.drift import measure_drift
from layermoe.pipeline.expand import expand_generation
from layermoe.pipeline.options import ExtendOptions
from layermoe.pipeline.profile import profile_generation

CLASSIFIER_MODES = ("generation", "binary")
EXPERT_INITS = ("expert0", "routed")


def run_extend(workdir: Workdir, options: ExtendOptions) -> None:
    """`layermoe extend`: open the next generation of the work dir's lineage."""
    with session(workdir):
        manifest = workdir.load()
        extend_generation(workdir, manifest, options)


def open_generation(manifest: Manifest, new: list[str]) -> Generation:
    """Append G(n+1) to the manifest, or return it when an interrupted `extend` already opened it."""

    new = validate_language_group(new, "--new")
    if not new:
        raise LayermoeError("--new needs at least one language, e.g. --new bn,hi,ne")
    current = manifest.current
    if current.new_languages == new and current.index >= 2:
        return current  # the same extension again: resume it where it stopped, or find it done
    stopped = stopped_extension(current)
    if stopped is not None:  # an extension to other languages that never opened: this one takes its place
        err_console.print(f"[yellow]note:[/] G{current.index} ({', '.join(current.new_languages)}) never opened "
                          f"(its {stopped[0]} failed): G{current.index} is {', '.join(new)} now", soft_wrap=True)
        manifest.generations.pop()
        current = manifest.current
    known = manifest.generation_of_language()
    taken = [lang for lang in new if lang in known]
    if taken:
        where = ", ".join(f"{lang} (G{known[lang]})" for lang in taken)
        raise LayermoeError(f"{where} is already learned: a new generation needs new languages")
    if latest_checkpoint(current) is None:
        raise LayermoeError(f"G{current.index} has no expanded model yet: run `layermoe expand` "
                            f"(and `layermoe train --stage 1/2`) before extending")
    if current.stage2.status != StepStatus.done:
        err_console.print(f"[yellow]note:[/] G{current.index} has not finished stage 2; extending from its latest model", soft_wrap=True)
    generation = Generation(index=current.index + 1, old_languages=current.languages, new_languages=new,
                            data=dict(current.data))
    manifest.generations.append(generation)
    return generation


def extend_generation(workdir: Workdir, manifest: Manifest, options: ExtendOptions) -> Generation:
    """Profile, allocate and expand G(n+1) with `options.profile/allocate/expand` (each step skipped when done),
    then measure the earlier languages' drift."""
    _check_arguments(manifest, options)
    generation = open_generation(manifest, options.new)
    if generation.expansion.status == StepStatus.done and "bpb_drift" in generation.expansion.metrics:
        raise StepAlreadyDone(f"G{generation.index} ({', '.join(options.new)}) is open already: train it with "
                              "`layermoe train --stage 1`")
    device = resolve_device(options.device)
    if generation.profile.status != StepStatus.done:
        profile = options.profile.model_copy(update={"data": list(options.data), "device": device})
        profile_generation(workdir, manifest, generation, profile)
    with _profile_kept(workdir, manifest, generation, options.new):
        if generation.allocation.status != StepStatus.done:
            allocate_generation(workdir, manifest, generation, options.allocate)
        if generation.expansion.status != StepStatus.done:
            expand_generation(workdir, manifest, generation, options.expand.model_copy(update={"device": device}))
    measure_drift(workdir, manifest, generation, device, options.drift_tokens)
    workdir.save(manifest)
    return generation


@contextmanager
def _profile_kept(workdir: Workdir, manifest: Manifest, generation: Generation, new: list[str]):
    """The allocation or expansion refusing what the profile measured (S^i <= 0 for Eq. 10, known only once measured)
    keeps the profile: the step is marked failed, the work dir keeps G(n+1) and its profile, and `extend` again
    with another strategy starts at the allocation."""
    try:
        yield
    except LayermoeError as e:
        record, name = ((generation.allocation, "allocation") if generation.allocation.status != StepStatus.done
                        else (generation.expansion, "expansion"))
        record.status, record.error, record.finished_at = StepStatus.failed, str(e), utc_now()
        workdir.save(manifest)
        raise StoppedWithWorkKept(f"{e} (G{generation.index}'s profile is kept: `layermoe extend --new "
                                  f"{','.join(new)}` with another --strategy starts at the {name})") from None


def _check_arguments(manifest: Manifest, options: ExtendOptions) -> None:
    """Every argument of `extend`, checked before the profile (minutes on a real model) starts."""

    allocate, expand = options.allocate, options.expand
    classifier = expand.classifier or "generation"
    expert_init = expand.expert_init or "expert0"
    if classifier not in CLASSIFIER_MODES:
        raise LayermoeError(f"unknown classifier mode {classifier!r}: use generation or binary")
    if expert_init not in EXPERT_INITS:
        raise LayermoeError(f"unknown expert init {expert_init!r}: use expert0 or routed")
    if expand.router_init is not None and expand.router_init not in ROUTER_INITS:
        raise LayermoeError(f"unknown --router-init {expand.router_init!r}: use {', '.join(ROUTER_INITS[:-1])} "
                            f"or {ROUTER_INITS[-1]}")
    for option, value in (("--tokens", options.profile.tokens), ("--batch-tokens", options.profile.batch_tokens),
                          ("--drift-tokens", options.drift_tokens)):
        if value is not None and value < 1:
            raise LayermoeError(f"{option} must be positive, not {value}")
    strategy = allocate.strategy
    if strategy not in alloc.STRATEGIES:
        raise LayermoeError(f"unknown allocation strategy {strategy!r}: choose one of {', '.join(alloc.STRATEGIES)}")
    check_neuron_settings(strategy, allocate.neuron_mapping, allocate.min_experts, allocate.max_experts,
                          allocate.budget, allocate.new_experts, "exact", None)
    linear = strategy == "neuron" and allocate.neuron_mapping == "linear"
    manual = allocate.experts_per_layer is not None or allocate.total_experts_per_layer is not None
    if manual:
        counts = manual_counts(manifest, manifest.current if manifest.current.index >= 2 and
                               manifest.current.new_languages == options.new else _next(manifest), allocate)
        alloc.allocate_manual(counts, manifest.base_model.num_layers)
        return
    if allocate.budget is None and allocate.new_experts is None and not linear:
        raise LayermoeError("give --budget (δ, counting expert 0 of every layer) or --new-experts for the new generation")
    num_layers = manifest.base_model.num_layers
    if num_layers and not linear:
        delta = resolve_budget(allocate.budget, allocate.new_experts, num_layers)
        k = alloc.default_classifier_k(num_layers) if allocate.classifier_layers is None else allocate.classifier_layers
        alloc.validate_budget(num_layers, delta, k=k, strategy=strategy)


def _next(manifest: Manifest) -> Generation:
    """The generation `extend` is about to open (not appended: only its index matters to the checks)."""
    return Generation(index=manifest.current.index + 1, old_languages=manifest.current.languages, new_languages=[])
