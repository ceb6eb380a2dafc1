"""`layermoe profile`: layer-wise language similarity of the current model (Eq. 8-9)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from layermoe.core.console import console, err_console
from layermoe.core.devices import resolve_device, resolve_dtype
from layermoe.core.errors import LayermoeError
from layermoe.core.integrity import safetensors_checksums
from layermoe.core.manifest import BaseModelRecord, DataSourceRecord, Generation, Manifest
from layermoe.core.progress import token_progress
from layermoe.core.workdir import Workdir, atomic_write_text, run_step, session
from layermoe.data import describe_source, load_texts, parse_data_args
from layermoe.data.languages import validate_language_group
from layermoe.modeling.base import (
    _read_config_json,
    check_model_folder,
    check_supported,
    gguf_architecture,
    model_files_sha256,
    resolve_model_spec,
)
from layermoe.pipeline.common import documents_for_tokens, load_generation_model, texts_for
from layermoe.pipeline.options import ProfileOptions
from layermoe.profiling.plots import plot_profile
from layermoe.profiling.similarity import layer_scores, pair_means, profile_model


def describe_data(workdir: Workdir, languages: list[str], data_args: list[str], text_field: str,
                  inherited: dict[str, DataSourceRecord] | None = None) -> dict[str, DataSourceRecord]:
    """One data source per language: --data if given, else what an earlier generation used, else builtin."""

    given = parse_data_args(data_args)
    unknown = sorted(set(given) - set(languages))
    if unknown:
        raise LayermoeError(f"--data given for {', '.join(unknown)}, which is not among the languages ({', '.join(languages)})")
    inherited = inherited or {}
    records = {}
    for language in languages:
        if language not in given and language in inherited:
            records[language] = inherited[language]
            continue
        spec = given.get(language, "builtin")
        info = describe_source(language, spec, text_field=text_field)
        _check_enough_documents(language, spec, info.get("num_documents"), text_field, workdir)
        absolute = None
        if info["kind"] not in ("builtin", "hf"):  # a path: stored both ways, as the base model is
            spec, absolute = workdir.rel(spec), str(Path(spec).resolve())
        records[language] = DataSourceRecord(spec=spec, absolute_path=absolute, kind=info["kind"], sha256=info["sha256"],
                                             documents=info.get("num_documents"), text_field=text_field)
    return records


def _check_enough_documents(language: str, spec: str, documents: int | None, text_field: str, workdir: Workdir) -> None:
    """Refuse now a source that `eval` could not use later: it needs a held-out document and a training one."""

    if documents is not None and documents < 2:
        raise LayermoeError(f"data for {language!r}: {spec} has {documents} document{'' if documents == 1 else 's'}; "
                            "layermoe holds some out for eval, so it needs at least 2 (one per line in a .txt file)")
    if not load_texts(language, spec, split="heldout", limit=1, cache_dir=workdir.cache_dir / "datasets", text_field=text_field):
        raise LayermoeError(f"data for {language!r}: no document of {spec} is held out for eval (are they all the same "
                            "text?): give it more distinct documents")


def new_manifest(workdir: Workdir, model: str | None, old: list[str], new: list[str]) -> Manifest:
    """The manifest of a fresh work dir: G0 = the base model's languages, G1 = the first new group."""

    if not model:
        raise LayermoeError("a new work dir needs --model (a local dir, a hub id, a .gguf file, or `demo`)")
    if not old or not new:
        raise LayermoeError("a new work dir needs --old and --new, e.g. --old en,zh,es --new el,hu,tr")
    old = validate_language_group(old, "--old")
    new = validate_language_group(new, "--new")
    _check_disjoint(old, new)
    source = resolve_model_spec(model)
    check_supported({"model_type": peek_model_type(source)} if source.kind != "hub" else {"model_type": "llama"})
    if source.kind == "local":
        check_model_folder(source.path)  # up front: the data is read and the model loaded only later
    kind = "demo" if model == "demo" else source.kind
    stored_path = None if kind in ("hub", "demo") else workdir.rel(source.path / source.gguf_file if kind == "gguf" else source.path)
    base = BaseModelRecord(
        spec=model if kind in ("hub", "demo") else stored_path,
        kind=kind,
        path=stored_path,
        absolute_path=None if stored_path is None else str(workdir.resolve(stored_path)),
        hub_id=source.hub_id,
        revision=source.revision,
        gguf_file=source.gguf_file,
        tensor_sha256=_base_tensor_digests(source),  # first: it leaves the files' sha256 memoised for the next line
        sha256=model_files_sha256(source) if kind != "hub" else {},
    )
    return Manifest(
        base_model=base,
        generations=[Generation(index=0, new_languages=old), Generation(index=1, old_languages=old, new_languages=new)],
    )


def _base_tensor_digests(source) -> dict[str, dict[str, str]]:
    """Per-tensor digests of a local base model's safetensors files (they name a tensor that changes later)."""

    if source.kind != "local":
        return {}
    return {path.name: safetensors_checksums(path)[1] for path in sorted(source.path.glob("*.safetensors"))}


def peek_model_type(source) -> str | None:
    """The architecture of a local or GGUF model, read without loading its weights."""

    if source.kind == "local":
        return _read_config_json(source.path).get("model_type")
    if source.kind == "gguf":
        return gguf_architecture(source.gguf_path)
    return None


def record_base_shape(manifest: Manifest, model) -> None:
    """Fill the base model's shape once it is loaded (hub and GGUF models show it only then)."""

    base, config = manifest.base_model, model.config
    check_supported(config)
    base.model_type = config.model_type
    base.num_layers = config.num_hidden_layers
    base.hidden_size = config.hidden_size
    base.intermediate_size = config.intermediate_size
    base.num_parameters = sum(p.numel() for p in model.parameters())


def _check_disjoint(old: list[str], new: list[str]) -> None:
    both = sorted(set(old) & set(new))
    if both:
        raise LayermoeError(f"{', '.join(both)} is both old and new: a language belongs to one generation")


def run_profile(workdir: Workdir, options: ProfileOptions) -> None:
    """`layermoe profile`: profile the current generation (a new work dir starts from --model, --old, --new)."""
    _check_profile_options(options)
    with session(workdir):
        if workdir.has_manifest():
            manifest = workdir.load()
            generation = manifest.current
            _check_matches(workdir, manifest, generation, options.model, options.old, options.new)
        else:
            manifest = new_manifest(workdir, options.model, options.old, options.new)
            generation = manifest.generations[1]
        profile_generation(workdir, manifest, generation, options)


def _check_profile_options(options: ProfileOptions) -> None:
    if options.tokens < 1 or options.batch_tokens < 1:
        raise LayermoeError("--tokens and --batch-tokens must be positive")
    _check_neuron_options(options.neuron_top_n, options.neuron_documents)
    if options.document_order not in ("shuffled", "file"):
        raise LayermoeError(f"unknown --document-order {options.document_order!r}: use shuffled or file")
    if options.long_documents not in ("split", "truncate"):
        raise LayermoeError(f"unknown --long-documents {options.long_documents!r}: use split or truncate")
    if options.max_document_tokens is not None and options.max_document_tokens < 2:
        raise LayermoeError(f"--max-document-tokens must be at least 2, not {options.max_document_tokens}")


def _check_neuron_options(neuron_top_n: int, neuron_documents: int) -> None:
    if neuron_top_n < 0:
        raise LayermoeError(f"--neuron-top-n must be 0 (no neuron count) or more, got {neuron_top_n}")
    if neuron_documents < 1:
        raise LayermoeError(f"--neuron-docs must be at least 1, got {neuron_documents}")


def profile_generation(workdir: Workdir, manifest: Manifest, generation: Generation, options: ProfileOptions) -> None:
    """Profile one generation inside an open session (the CLI's, `extend`'s and the recipe runner's shared body)."""
    _check_profile_options(options)
    generation.data = describe_data(workdir, generation.languages, list(options.data), options.text_field,
                                    inherited=generation.data)
    device = resolve_device(options.device)
    config = dict(tokens=options.tokens, batch_tokens=options.batch_tokens, device=device, dtype=options.dtype,
                  seed=options.seed, include_bos=options.include_bos, neuron_top_n=options.neuron_top_n,
                  neuron_documents=options.neuron_documents)
    if options.model_fields_set & {"document_order", "long_documents", "max_document_tokens"}:  # the authors' context
        config.update(document_order=options.document_order, long_documents=options.long_documents,
                      max_document_tokens=options.max_document_tokens)
    label = f"profile of G{generation.index}"
    with run_step(workdir, manifest, generation.profile, label, config, options.force) as record:
        _profile(workdir, manifest, generation, record, options, device, resolve_dtype(options.dtype, device))


def _same_model(workdir: Workdir, manifest: Manifest, model: str) -> bool:
    from pathlib import Path

    base = manifest.base_model
    if model in (base.spec, base.hub_id):
        return True
    return Path(model).exists() and base.path is not None and workdir.rel(model) == base.path


def _check_matches(workdir: Workdir, manifest: Manifest, generation: Generation, model, old, new) -> None:
    if model and manifest.base_model and not _same_model(workdir, manifest, model):
        raise LayermoeError(
            f"this work dir was made from {manifest.base_model.spec}, not {model}: use another --workdir for another model"
        )
    if old and old != generation.old_languages:
        raise LayermoeError(f"G{generation.index} has old languages {', '.join(generation.old_languages)}, not {', '.join(old)}: "
                            "use another --workdir, or `layermoe extend` for a next generation")
    if new and new != generation.new_languages:
        raise LayermoeError(f"G{generation.index} adds {', '.join(generation.new_languages)}, not {', '.join(new)}: "
                            "use `layermoe extend --new ...` to open the next generation")


def _profile(workdir: Workdir, manifest: Manifest, generation: Generation, record, options: ProfileOptions, device: str,
             dtype) -> None:

    limit = documents_for_tokens(options.tokens)
    texts = {lang: texts_for(workdir, generation, lang, "train", limit=limit) for lang in generation.languages}
    model, tokenizer = load_generation_model(workdir, manifest, generation, device=device, dtype=dtype)
    if generation.index == 1:
        record_base_shape(manifest, model)
    with token_progress("profile") as update:
        result = profile_model(model, tokenizer, texts, tokens_per_language=options.tokens,
                               batch_tokens=options.batch_tokens, include_bos=options.include_bos, seed=options.seed,
                               device=device, progress=update, neuron_top_n=options.neuron_top_n,
                               neuron_documents=options.neuron_documents, max_document_tokens=options.max_document_tokens,
                               document_order=options.document_order, long_documents=options.long_documents)
    old, new = generation.old_languages, generation.new_languages
    record.languages = list(result.languages)
    record.matrix = result.matrix
    record.similarity = layer_scores(result.matrix, result.languages, old, new)
    new_new, new_old = pair_means(result.matrix, result.languages, old, new)
    record.new_new = None if len(new) == 1 else [float(x) for x in new_new]
    record.new_old = [float(x) for x in new_old]
    record.tokens_per_language = dict(result.tokens_per_language)
    record.model_sha256 = manifest.base_model.sha256 if generation.index == 1 else {}
    for language, count in result.tokens_per_language.items():
        if count == 0:
            raise LayermoeError(f"no tokens of {language} to profile: its training-side data is empty")
    if result.neurons is not None:
        if result.neurons.top_n < options.neuron_top_n:
            err_console.print(f"[yellow]note:[/] the model has only {result.neurons.top_n:,} FFN neurons, fewer than "
                              f"--neuron-top-n {options.neuron_top_n:,}: every neuron counts, so the neuron counts carry no signal",
                              soft_wrap=True)
        record.neuron_counts = list(result.neurons.unique_per_layer)
        record.neuron_counts_by_language = dict(result.neurons.per_language)
        record.neuron_top_n = result.neurons.top_n
        record.neuron_documents = dict(result.neurons.documents)
    record.routing_mass = result.routing_mass

    out = workdir.generation_dir(generation.index)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(languages=record.languages, old=old, new=new, similarity=record.similarity, new_new=record.new_new,
                   new_old=record.new_old, tokens_per_language=record.tokens_per_language, matrix=record.matrix)
    if record.neuron_counts is not None:
        payload["neurons"] = dict(top_n=record.neuron_top_n, documents=record.neuron_documents,
                                  unique_per_layer=record.neuron_counts, per_language=record.neuron_counts_by_language)
    if record.routing_mass is not None:
        payload["routing_mass"] = record.routing_mass
    atomic_write_text(out / "profile.json", json.dumps(payload, indent=1))
    plot_profile(record.similarity, record.matrix, record.languages, old, new, out / "profile.png",
                 neuron_counts=record.neuron_counts, neuron_top_n=record.neuron_top_n)
    record.outputs = {"json": workdir.rel(out / "profile.json"), "plot": workdir.rel(out / "profile.png")}
    console.print(profile_table(generation, record))
    err_console.print(f"wrote {record.outputs['plot']} and {record.outputs['json']} in {workdir.root}")


def profile_table(generation: Generation, record) -> Table:
    table = Table(title=f"G{generation.index} layer similarity S^i (Eq. 9): {', '.join(generation.new_languages)} vs "
                        f"{', '.join(generation.old_languages)}", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("S^i", justify="right")
    table.add_column("new–new", justify="right")
    table.add_column("new–old", justify="right")
    if record.neuron_counts is not None:
        table.add_column(f"neurons\n(top {record.neuron_top_n:,})", justify="right")
    order = sorted(range(len(record.similarity)), key=lambda i: record.similarity[i])
    rank = {layer: r for r, layer in enumerate(order)}
    for i, score in enumerate(record.similarity):
        style = "bold" if rank[i] < 3 else ""
        nn = "—" if record.new_new is None else f"{record.new_new[i]:.4f}"
        cells = [str(i), f"[{style}]{score:.4f}[/]" if style else f"{score:.4f}", nn, f"{record.new_old[i]:.4f}"]
        if record.neuron_counts is not None:
            cells.append(f"{record.neuron_counts[i]:,}")
        table.add_row(*cells)
    table.caption = "lowest three (most language-specific) in bold; tokens: " + ", ".join(
        f"{k} {v:,}" for k, v in record.tokens_per_language.items())
    if record.neuron_counts is not None:
        table.caption += ("; neurons: unique language-specific FFN neurons among each language's top "
                          f"{record.neuron_top_n:,} by AP (documents: "
                          + ", ".join(f"{k} {v}" for k, v in record.neuron_documents.items()) + ")")
    return table
