"""`layermoe expand`: upcycle into the layer-wise MoE and save a Hugging Face checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.table import Table

from layermoe.core.console import console, err_console
from layermoe.core.devices import resolve_device
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Generation, Manifest, StepStatus
from layermoe.core.numbers import human_bytes
from layermoe.core.workdir import Workdir, fsync_path, run_step, session
from layermoe.modeling import add_generation, save_layermoe, upcycle
from layermoe.pipeline.allocate import allocate_generation
from layermoe.pipeline.common import load_generation_model, record_checkpoint, texts_for
from layermoe.pipeline.drift import measure_drift
from layermoe.pipeline.options import AllocateOptions, ExpandOptions
from layermoe.pipeline.vocab import (
    check_vocabulary_options,
    extend_model_vocabulary,
    record_vocabulary_rows,
    save_extended_tokenizer,
    vocabulary_record,
)
from layermoe.profiling.expert_use import most_routed_experts

# Logits of the expanded model must equal the base model's this closely (fp32). Copies of
# expert 0 mixed with weights that sum to 1 only up to rounding leave ~1 ulp per layer, which
# deep models with large logits can accumulate: above the tolerance we warn, above the bug
# threshold (10x) we stop.
PRESERVATION_TOLERANCE = 1e-4
PRESERVATION_BUG = 1e-3
CHECKPOINT_DIR = "expanded"


def run_expand(workdir: Workdir, options: ExpandOptions) -> None:
    """`layermoe expand`: the expansion of the current generation."""
    with session(workdir):
        manifest = workdir.load()
        expand_generation(workdir, manifest, manifest.current, options)


DEFAULT_TOP_K = 2


def expand_generation(workdir: Workdir, manifest: Manifest, generation: Generation, options: ExpandOptions) -> None:
    """Expand `generation`. G1 upcycles the base model with `top_k` and `classifier_granularity`;
    G2 and later extend the previous model, whose top-k and granularity they keep (giving others
    is refused), with `router_init`, `classifier` and `expert_init` (default: what this generation
    used before)."""
    budget, top_k, classifier_granularity = options.budget, options.top_k, options.classifier_granularity
    router_init, classifier, expert_init = options.router_init, options.classifier, options.expert_init
    device, force = options.device, options.force
    if generation.index == 1:
        top_k = DEFAULT_TOP_K if top_k is None else top_k
        classifier_granularity = classifier_granularity or "token"
        expert_init = expert_init or "expert0"
    else:
        first = manifest.generations[1].expansion.config
        kept = {"top-k": (top_k, first.get("top_k", DEFAULT_TOP_K)),
                "classifier-granularity": (classifier_granularity, first.get("classifier_granularity", "token"))}
        for option, (given, model_value) in kept.items():
            if given is not None and given != model_value:
                raise LayermoeError(f"--{option} {given}: the {option} is chosen when G1 is expanded, and G{generation.index} "
                                    f"keeps that of the model it extends ({model_value}): drop --{option}")
        top_k, classifier_granularity = kept["top-k"][1], kept["classifier-granularity"][1]
        recorded = generation.expansion.config
        router_init = router_init or recorded.get("router_init")
        classifier = classifier or recorded.get("classifier") or "generation"
        expert_init = expert_init or recorded.get("expert_init") or "expert0"
    if top_k < 1:
        raise LayermoeError(f"--top-k must be at least 1, not {top_k}")
    check_vocabulary_options(options)
    if expert_init == "routed" and generation.index == 1:
        raise LayermoeError("--expert-init routed needs an expanded model to route with: it applies from G2 (`layermoe extend`)")
    if expert_init == "routed" and not generation.profile.routing_mass:
        raise LayermoeError(f"the profile of G{generation.index} has no routing record (an older layermoe made it): "
                            "redo it with `layermoe profile --force`")
    if classifier_granularity not in ("token", "sequence"):
        raise LayermoeError(f"unknown classifier granularity {classifier_granularity!r}: use token or sequence")
    if generation.allocation.status != StepStatus.done:
        if budget is None:
            raise LayermoeError(f"G{generation.index} has no allocation yet: run `layermoe allocate --budget N` first, "
                                "or pass --budget to `expand`")
        strategy = "layerwise" if generation.profile.status == StepStatus.done else "uniform"
        allocate_generation(workdir, manifest, generation, AllocateOptions(budget=budget, strategy=strategy))
    allocation = generation.allocation
    if len(allocation.experts_per_layer) != manifest.base_model.num_layers:
        raise LayermoeError(f"the allocation has {len(allocation.experts_per_layer)} layers but the model has "
                            f"{manifest.base_model.num_layers}: run `layermoe allocate --force --budget N` again")
    out = workdir.generation_dir(generation.index) / CHECKPOINT_DIR
    if out.exists() and not _is_ours(out):
        raise LayermoeError(f"{out} exists and is not a layermoe checkpoint: move it away or use another --workdir")

    if generation.index == 1 and top_k > max(allocation.experts_per_layer):
        raise LayermoeError(f"--top-k {top_k} is more than the most experts any layer has "
                            f"({max(allocation.experts_per_layer)}): use at most that many")
    device = resolve_device(device)
    _check_room(manifest, generation, device, out)
    if generation.index >= 2 and router_init is None:  # new rows tie with the expert the new experts copy
        router_init = "source" if expert_init == "routed" else "expert0"
    config = dict(top_k=top_k, classifier_granularity=classifier_granularity, device=device, router_init=router_init,
                  classifier=classifier, expert_init=expert_init)
    if options.new_tokens is not None:
        config.update(new_tokens=options.new_tokens, attach_marks=options.attach_marks, vocab_text_mb=options.vocab_text_mb,
                      vocab_old_documents=options.vocab_old_documents)
    with run_step(workdir, manifest, generation.expansion, f"expansion of G{generation.index}", config, force) as record:
        _expand(workdir, manifest, generation, record, out, options.model_copy(update=dict(
            top_k=top_k, classifier_granularity=classifier_granularity, device=device, router_init=router_init,
            classifier=classifier, expert_init=expert_init)))
    if generation.index == 1 and options.new_tokens is not None:  # the new tokens enter the softmax: what it costs
        measure_drift(workdir, manifest, generation, device, None)
        workdir.save(manifest)


def available_memory(device: str) -> int:
    """Bytes free for new tensors on `device` (CUDA: free device memory; CPU: available RAM)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def _check_room(manifest: Manifest, generation: Generation, device: str, out: Path) -> None:
    """Refuse, before anything is allocated, an expansion that cannot fit in memory or on disk.

    In float32, G1 holds the base model, its copy being upcycled and the new experts; later
    generations extend the loaded model in place. The checkpoint is written beside the old one.
    """
    base = manifest.base_model
    if not (base.num_parameters and base.hidden_size and base.intermediate_size):
        return  # the shape is recorded by the profile; without it there is nothing to estimate
    new_experts = sum(generation.allocation.new_experts_per_layer)
    new = new_experts * 3 * base.hidden_size * base.intermediate_size
    if generation.index == 1:
        source, copies, what = base.num_parameters, 2, "the base model, its copy"
    else:
        source, copies, what = manifest.generations[generation.index - 1].expansion.total_parameters or 0, 1, "the model"
    need = 4 * (copies * source + new)
    free = available_memory(device)
    if need > free:
        raise LayermoeError(f"the expansion needs about {human_bytes(need)} of memory, but only {human_bytes(free)} are free "
                            f"on {device} (float32: {what} and {new_experts:,} new experts): lower the budget")
    disk = 4 * (source + new)
    free_disk = shutil.disk_usage(next(parent for parent in out.parents if parent.exists())).free
    if disk > free_disk:
        raise LayermoeError(f"the expanded checkpoint needs about {human_bytes(disk)} of disk, but only "
                            f"{human_bytes(free_disk)} are free under {out.parent}: free some space or lower the budget")


def _is_ours(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "layermoe"
    except (OSError, ValueError):
        return False


def _expand(workdir: Workdir, manifest: Manifest, generation: Generation, record, out: Path, options: ExpandOptions) -> None:
    top_k, granularity, device = options.top_k, options.classifier_granularity, options.device
    router_init, classifier, expert_init = options.router_init, options.classifier, options.expert_init
    import torch


    source, tokenizer = load_generation_model(workdir, manifest, generation, device=device, dtype=torch.float32)
    probe = _probe_batch(workdir, generation, tokenizer, device)
    with torch.no_grad():
        reference = source(**probe).logits.float()
    allocation = generation.allocation
    if generation.index == 1:
        model = upcycle(source, allocation.new_experts_per_layer, classifier_layers=allocation.classifier_layers,
                        top_k=top_k, classifier_granularity=granularity)
    else:
        sources = None
        if expert_init == "routed":
            sources = most_routed_experts(generation.profile.routing_mass, generation.new_languages)
        model = add_generation(source, allocation.new_experts_per_layer, allocation.classifier_layers,
                               classifier_classes=2 if classifier == "binary" else None, router_init=router_init,
                               expert_sources=sources)
        record.expert_init = expert_init
        record.expert_sources = sources if sources is not None else [0] * len(allocation.new_experts_per_layer)
    rows_before = model.get_input_embeddings().weight.shape[0]
    vocabulary = None
    if options.new_tokens is not None:
        check_vocabulary_options(options, tokenizer)
        vocabulary = extend_model_vocabulary(workdir, generation, model, tokenizer, options)
    if vocabulary is not None or getattr(model.config, "vocab_sizes", None):
        record_vocabulary_rows(model, rows_before, generation.index)
    model.eval()
    with torch.no_grad():  # the old rows only: new tokens are new logits, old-token inputs compute as before
        logits = model(**probe).logits.float()[..., : reference.shape[-1]]
    diff = (logits - reference).abs().max().item()
    # Upcycling a dense model must reproduce it exactly. Extending a trained MoE need not: new
    # router rows that tie with expert 0 pull some earlier tokens onto the (expert-0-like) new
    # experts; `extend` measures that drift in bits per byte instead.
    if generation.index == 1 and not diff <= PRESERVATION_BUG:
        raise RuntimeError(f"the expanded model does not reproduce its source (max |Δlogit| = {diff:.3g}): this is a bug")

    # Write next to the target, then rename: a crash never leaves a checkpoint that looks complete.
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_layermoe(model, staging, tokenizer=tokenizer)
    if vocabulary is not None:
        save_extended_tokenizer(vocabulary, staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    fsync_path(out.parent)

    base = manifest.base_model
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * base.hidden_size * base.intermediate_size
    idle = sum(max(0, n - min(top_k, n)) for n in model.config.experts_per_layer) * per_expert
    record_checkpoint(workdir, record, out)  # sha256 of every file, verified whenever the model is read
    record.max_abs_logit_diff = diff
    record.total_parameters, record.active_parameters = total, total - idle
    record.added_parameters = total - base.num_parameters if base.num_parameters else None
    record.outputs = {"checkpoint": record.checkpoint}
    if vocabulary is not None:
        record.metrics["vocabulary"] = vocabulary_record(vocabulary, options)
    console.print(_table(generation, record, base.num_parameters))
    if vocabulary is not None:
        console.print(vocabulary_table(generation, vocabulary))
    if generation.index == 1 and diff <= PRESERVATION_TOLERANCE:
        err_console.print(f"checked: max |Δlogit| against the base model = {diff:.2e} (≤ {PRESERVATION_TOLERANCE:g})")
    elif generation.index == 1:
        err_console.print(f"[yellow]note:[/] max |Δlogit| against the base model = {diff:.2e}, above {PRESERVATION_TOLERANCE:g} "
                          "(float rounding accumulated over the layers; recorded in the manifest)", soft_wrap=True)
    else:
        err_console.print(f"max |Δlogit| against G{generation.index - 1}'s model = {diff:.2e} (expert_init {expert_init}, "
                          f"router_init {router_init}; the bits-per-byte drift follows)", soft_wrap=True)
        if expert_init == "routed":
            err_console.print("new experts copy, per layer: " + ", ".join(
                f"{i}:{e}" for i, (e, n) in enumerate(zip(record.expert_sources, allocation.new_experts_per_layer)) if n),
                soft_wrap=True)


def vocabulary_table(generation: Generation, vocabulary) -> Table:
    """Bytes per token of the new languages' held-out text, before and after the new tokens."""
    report = vocabulary.result.report
    table = Table(title=f"G{generation.index} new vocabulary: {report.new_tokens:,} tokens "
                        f"(ids {report.first_new_id}-{report.last_new_id}); old-language documents unchanged: "
                        f"{report.old_docs_unchanged:,} of {report.old_docs_checked:,}", title_justify="left")
    for column in ("language", "bytes/token before", "after", "×", "tokens/word before", "after "):
        table.add_column(column, justify="left" if column == "language" else "right")
    for lang, entry in report.languages.items():
        side = entry.get("heldout") or entry["train_sample"]
        table.add_row(lang, f"{side['bytes_per_token_before']:.2f}", f"{side['bytes_per_token_after']:.2f}",
                      f"{side['ratio']:.2f}" if side["ratio"] else "—", f"{side['tokens_per_word_before']:.2f}",
                      f"{side['tokens_per_word_after']:.2f}")
    table.caption = (f"{report.rejected_by_old_languages:,} candidate merges refused to keep the old languages' tokens; "
                     f"{report.stop_reason}")
    return table


def _probe_batch(workdir, generation, tokenizer, device, documents_per_language: int = 2, max_length: int = 64):
    """A few held-out sequences of every language of the generation: what `expand` checks itself on."""
    texts = []
    for language in generation.languages:
        texts += texts_for(workdir, generation, language, "heldout")[:documents_per_language]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _table(generation: Generation, record, base_parameters) -> Table:
    table = Table(title=f"G{generation.index} expanded → {record.checkpoint}", title_justify="left")
    table.add_column("total parameters", justify="right")
    table.add_column("active per token", justify="right")
    table.add_column("added", justify="right")
    table.add_column("max |Δlogit| vs source", justify="right")
    added = "—"
    if record.added_parameters is not None and base_parameters:
        added = f"{record.added_parameters:,} (+{100 * record.added_parameters / base_parameters:.1f}%)"
    table.add_row(f"{record.total_parameters:,}", f"{record.active_parameters:,}", added, f"{record.max_abs_logit_diff:.2e}")
    return table
