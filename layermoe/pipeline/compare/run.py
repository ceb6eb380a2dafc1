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
import os
import shutil
import time
from pathlib import Path

from layermoe.core.console import console, err_console
from layermoe.core.devices import resolve_device
from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Manifest, StepStatus, utc_now
from layermoe.core.progress import token_progress
from layermoe.core.workdir import Workdir, atomic_write_text, session
from layermoe.data import prepare
from layermoe.evaluation import evaluate_languages
from layermoe.evaluation.windows import texts_within_tokens
from layermoe.modeling import parameter_groups
from layermoe.modeling.base import gguf_checkpoint_dir, load_model, resolve_model_spec
from layermoe.modeling.generation import continue_text
from layermoe.pipeline.common import documents_for_tokens, load_base, load_recorded_checkpoint, texts_for
from layermoe.pipeline.compare.plan import TITLES, check_compare_recipe, expert_budgets, plan_variants, wanted
from layermoe.pipeline.compare.render import compare_table, summarise, write_outputs
from layermoe.pipeline.lineage import run_lineage
from layermoe.pipeline.options import AllocateOptions, CompareOptions
from layermoe.pipeline.prepare import prepared_root, stage_sources
from layermoe.pipeline.recipes import load_recipe
from layermoe.training.loop import train_stage
from layermoe.vocabulary.files import save_clean_tokenizer

# ---------------------------------------------------------------- entry points


def run_compare_recipe(workdir: Workdir, options: CompareOptions) -> dict:
    """`layermoe compare [RECIPE] [--budgets ...]`: the shipped demo comparison unless a recipe is given."""
    budgets = parse_budgets(options.budgets)
    recipe = load_recipe(options.recipe or "compare")
    if recipe.compare is None:
        raise LayermoeError(f"{options.recipe} has no `compare:` section: use `layermoe run` for an ordinary recipe")
    return run_compare(workdir, recipe, budgets=budgets)


def parse_budgets(value: str | None) -> list[int] | None:
    """`--budgets 36,54,72` -> [36, 54, 72] (None when not given)."""
    try:
        budgets = [int(part) for part in (value or "").split(",") if part.strip()]
    except ValueError:
        raise LayermoeError(f"--budgets takes whole numbers separated by commas, not {value!r}") from None
    return budgets or None


def run_compare(workdir: Workdir, recipe, budgets: list[int] | None = None) -> dict:
    """Run (or resume) the variants of a recipe with a `compare:` section; print and write the table and plot."""
    spec, generation_spec = check_compare_recipe(recipe)
    if budgets:
        spec = spec.model_copy(update={"budgets": list(budgets)})
    stage1 = generation_spec.stage1
    dense_config = stage1.model_copy(update={"learning_rate": spec.dense_learning_rate or stage1.learning_rate})
    root = workdir.root / "compare"
    with workdir.lock():  # the sub work dirs have their own locks and rollback; this one keeps two runs apart
        shared_cache = root / "cache"
        num_layers = _base_num_layers(recipe.model, shared_cache)
        budgets_used = expert_budgets(num_layers, spec)
        variants = plan_variants(num_layers, spec, generation_spec.allocate.model_dump(exclude_unset=True))
        manifests = {}
        for variant in variants:
            allocate = variant["allocate"]
            delta = allocate.get("budget", num_layers + allocate["new_experts"] if "new_experts" in allocate else None)
            console.rule(f"[bold]compare: {variant['title']}[/] ({allocate['strategy']}"
                         + (f", δ = {delta})" if delta is not None else ", linear mapping)"))
            manifests[variant["name"]] = _run_moe_variant(Workdir(root / variant["name"]), shared_cache, recipe,
                                                          generation_spec, allocate, variant.get("expand"))
        # its manifest records the data every variant reads; a variant with the base tokenizer when there is one
        reference_name = next((v["name"] for v in variants if "expand" not in v), variants[0]["name"])
        reference = Workdir(root / reference_name)
        dense = None
        if wanted(spec, "dense"):
            console.rule(f"[bold]compare: {TITLES['dense']}")
            dense = _run_dense(root / "dense", reference, manifests[reference_name], dense_config)
        console.rule("[bold]compare: held-out bits per byte")
        max_tokens = generation_spec.eval.max_tokens if generation_spec.eval is not None else None
        equal_text = any("expand" in v for v in variants)
        figures = _evaluate_all(root, reference, manifests, dense, max_tokens, recipe.device, equal_text)
        table = summarise(manifests, variants, dense, figures, budgets_used, spec, max_tokens)
    write_outputs(workdir.root, table)
    console.print(compare_table(table))
    err_console.print(f"wrote {workdir.root / 'compare.md'}, {workdir.root / 'compare.json'} and {workdir.root / 'compare.png'}")
    return table


def _base_num_layers(model: str, cache: Path) -> int:
    """The base model's layer count, read from its config (a GGUF is converted once, into the shared cache)."""

    source = resolve_model_spec(model)
    if source.kind == "local":
        return int(json.loads((source.path / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    if source.kind == "gguf" and (gguf_checkpoint_dir(source, cache / "models") / "config.json").is_file():
        converted = gguf_checkpoint_dir(source, cache / "models")
        return int(json.loads((converted / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    loaded, _ = load_model(source, cache_dir=cache / "models")
    return int(loaded.config.num_hidden_layers)


# ---------------------------------------------------------------- the two MoE variants


def _run_moe_variant(workdir: Workdir, shared_cache: Path, recipe, generation_spec, allocate: dict,
                     expand: dict | None = None) -> Manifest:
    """One G0 → G1 run of the lineage runner in its own work dir, with this variant's allocation."""
    workdir.root.mkdir(parents=True, exist_ok=True)
    shared_cache.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(workdir.cache_dir):  # one converted base model and data cache for all variants
        # relative, so the work dir can move
        workdir.cache_dir.symlink_to(os.path.relpath(shared_cache, workdir.root), target_is_directory=True)
    if workdir.has_manifest():
        _check_same_allocation(workdir, workdir.load(), allocate)
        _check_same_vocabulary(workdir, workdir.load(), expand or {})
    variant = recipe.model_copy(update={
        "compare": None,
        "generations": [generation_spec.model_copy(update={
            "allocate": AllocateOptions(**allocate), "eval": None,
            "expand": generation_spec.expand.model_copy(update=expand or {})})],
    })
    with session(workdir):
        return run_lineage(workdir, variant)


def _check_same_vocabulary(workdir: Workdir, manifest: Manifest, expand: dict) -> None:
    record = manifest.generations[1].expansion
    if record.status != StepStatus.done:
        return
    recorded = {key: record.config.get(key, False if key == "attach_marks" else None) for key in ("new_tokens", "attach_marks")}
    wanted = {"new_tokens": expand.get("new_tokens"), "attach_marks": expand.get("attach_marks", False)}
    if recorded != wanted:
        raise LayermoeError(f"{workdir.root} was expanded with {recorded['new_tokens'] or 'no'} new tokens, not "
                            f"{wanted['new_tokens'] or 'none'}: delete that folder to compare at the new settings")


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
        save_clean_tokenizer(tokenizer, staging)
        staging.rename(base_dir)
        del model
    # Stage 1's data through the data package, in the reference work dir's cache: the LayerMoE
    # variant prepared the same sources with the same tokenizer and settings, so it is found there.
    from transformers import AutoTokenizer


    sources = {lang: s for lang, s in stage_sources(reference, generation).items() if lang in generation.new_languages}
    prepared = prepare(sources, manifest.generation_of_language(), 1, config.data,
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


def _evaluate_all(root: Path, reference: Workdir, manifests: dict[str, Manifest], dense: dict | None, max_tokens,
                  device, equal_text: bool = False) -> dict:
    """Bits per byte of the base model and every variant on one set of held-out texts (cached per model).

    `equal_text` (a vocabulary variant is compared): the texts are cut to what the base
    tokenizer's `max_tokens` covers and scored in full by every model, so each model reads the
    same bytes whatever its tokenizer (a token cap would give the longer tokens more text).
    """
    device = resolve_device(device)
    manifest = reference.load()
    generation = manifest.generations[1]
    languages = list(generation.languages)
    texts = {}

    def held_out():
        if not texts:
            base_tokenizer = load_base(reference, manifest, device="cpu")[1] if equal_text and max_tokens else None
            for lang in languages:
                texts[lang] = texts_for(reference, generation, lang, "heldout", limit=documents_for_tokens(max_tokens))
                if not texts[lang]:
                    raise LayermoeError(f"the held-out split of {lang} is empty: give it more documents with `data:`")
                if base_tokenizer is not None:
                    texts[lang] = texts_within_tokens(base_tokenizer, texts[lang], max_tokens)
        return texts

    def load_dense():
        return load_model(resolve_model_spec(str(root / "dense" / "model")), device=device)

    jobs = {"base": (lambda: load_base(reference, manifest, device=device), "base model")}
    for name in manifests:
        record = manifests[name].generations[1].stage2
        load = (lambda name=name, record=record: load_recorded_checkpoint(Workdir(root / name), manifests[name],
                                                                            record.checkpoint, device=device))
        jobs[name] = (load, record.finished_at.isoformat())
    if dense is not None:
        jobs["dense"] = (load_dense, dense["finished_at"])
    prompts = _generation_prompts(held_out, list(generation.new_languages)) if equal_text else None
    return {name: _measure(root / "eval" / f"{name}.json", name, load, trained, languages, max_tokens, held_out, device,
                           equal_text, prompts if name in ("layermoe", "layermoe-vocab") else None)
            for name, (load, trained) in jobs.items()}


GENERATED_TOKENS = 48  # per prompt, for the generation speed of a vocabulary comparison


def _generation_prompts(held_out, languages: list[str]):
    """One prompt per new language (the first words of its first held-out text), read when first needed."""
    def prompts():
        return {lang: " ".join(held_out()[lang][0].split()[:6]) for lang in languages}
    return prompts


def _measure(path: Path, name: str, load, trained: str, languages, max_tokens, held_out, device,
             equal_text: bool = False, prompts=None) -> dict:
    key = {"model": name, "trained": trained, "languages": languages, "max_tokens": max_tokens}
    if equal_text:
        key["equal_text"] = True
    if prompts is not None:
        key["generated_tokens"] = GENERATED_TOKENS
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached["key"] == key:
            err_console.print(f"[green]✓[/] eval of {TITLES.get(name, name)} is up to date")
            return cached
    model, tokenizer = load()
    with token_progress(f"eval {name}") as update:
        results = evaluate_languages(model, tokenizer, held_out(), max_tokens=None if equal_text else max_tokens,
                                     device=device, progress=update)
    figures = {"key": key, "bpb": {lang: r.bpb for lang, r in results.items()},
               "tokens": {lang: r.tokens for lang, r in results.items()},
               "bytes": {lang: r.bytes for lang, r in results.items()}, **_parameter_counts(model)}
    if prompts is not None:
        figures["generation"] = _generation_speed(model, tokenizer, prompts())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(figures, indent=2) + "\n")
    return figures


def _generation_speed(model, tokenizer, prompts: dict[str, str]) -> dict:
    """Greedy continuation of each prompt: characters of new text per second, per language.

    The fair decoding speed across tokenizers: tokens per second hides how much text a token
    holds. The first prompt runs twice and its first timing is dropped (warm-up).
    """
    speed = {}
    for k, (lang, prompt) in enumerate([next(iter(prompts.items()))] + list(prompts.items())):
        began = time.perf_counter()
        continuation = continue_text(model, tokenizer, prompt, max_new_tokens=GENERATED_TOKENS, stop_at_eos=False)
        seconds = time.perf_counter() - began
        if k:
            speed[lang] = {"characters": len(continuation.text), "tokens": len(continuation.new_ids), "seconds": seconds,
                           "characters_per_second": len(continuation.text) / seconds}
    return speed


def _parameter_counts(model) -> dict:
    """All parameters, and those some stage trained: every one for a dense model; new experts, routers, classifiers for MoE."""
    total = sum(p.numel() for p in model.parameters())
    if getattr(model.config, "model_type", None) != "layermoe":
        return {"total_parameters": total, "trained_parameters": total}

    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    groups = parameter_groups(model)
    trained = sum(sizes[n] for g in ("experts_g1", "router", "classifier") for n in groups.get(g, []))
    vocab_sizes = getattr(model.config, "vocab_sizes", None)
    if vocab_sizes:  # stage 1 also trains the new embedding rows (input, and output when lm_head is untied)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        trained += (vocab_sizes[-1] - vocab_sizes[0]) * model.config.hidden_size * (1 if tied else 2)
    return {"total_parameters": total, "trained_parameters": trained}


