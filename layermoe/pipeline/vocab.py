"""The vocabulary part of `expand --new-tokens N`: new tokens for the new languages, learned from their
training side, with every old language's tokens left exactly as they were (`layermoe.vocabulary`),
and the model's embedding rows grown for them (`modeling.vocabulary`).

What is checked against what: the new merges are learned from the new languages' training-side
documents (never the held-out split, at most `--vocab-text-mb` per language); every old language's
held-out documents and its first `--vocab-old-documents` training documents must tokenize to exactly
the ids they had, or the extension is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import Generation
from layermoe.core.workdir import Workdir, atomic_write_text
from layermoe.modeling.vocabulary import add_token_rows
from layermoe.pipeline.common import documents_of, texts_for
from layermoe.pipeline.options import ExpandOptions
from layermoe.vocabulary.extension import ExtensionResult, extend_tokenizer
from layermoe.vocabulary.files import save_tokenizer
from layermoe.vocabulary.kinds import MAX_NEW_TOKENS_CAP, VocabError, describe_tokenizer

SOURCES_FILE = "new_token_sources.json"  # in the checkpoint: each new token id -> the old ids it replaces


@dataclass
class VocabularyStep:
    result: ExtensionResult
    rows: int  # embedding rows after the step


def check_vocabulary_options(options: ExpandOptions, tokenizer=None) -> None:
    """Refuse bad --new-tokens settings (and, given the tokenizer, an unsupported one) before anything is built."""
    if options.new_tokens is None:
        if options.attach_marks:
            raise LayermoeError("--attach-marks belongs to --new-tokens N")
        return
    if options.new_tokens < 1:
        raise LayermoeError(f"--new-tokens must be at least 1, not {options.new_tokens}")
    if options.new_tokens > MAX_NEW_TOKENS_CAP:
        raise LayermoeError(f"--new-tokens {options.new_tokens:,} is over the cap of {MAX_NEW_TOKENS_CAP:,}: each new token is "
                            "an embedding row to train, and merges that rare cannot be trained")
    if options.vocab_text_mb < 1 or options.vocab_old_documents < 0:
        raise LayermoeError("--vocab-text-mb must be at least 1 and --vocab-old-documents at least 0")
    if tokenizer is not None:
        try:
            describe_tokenizer(tokenizer_json(tokenizer))
        except VocabError as e:
            raise LayermoeError(f"--new-tokens: {e}") from None


def tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json of a fast tokenizer, as a dict, without the truncation and padding a call left
    on it (a run's settings, e.g. the probe batch's 64-token truncation, not the tokenizer's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LayermoeError("--new-tokens needs a fast tokenizer (a tokenizer.json); this model's is a slow one")
    found = json.loads(backend.to_str())
    found["truncation"] = found["padding"] = None
    return found


def extend_model_vocabulary(workdir: Workdir, generation: Generation, model, tokenizer, options: ExpandOptions) -> VocabularyStep:
    """Learn the new tokens, check the old languages unchanged, grow and initialise the embedding rows."""
    new_texts = {lang: documents_of(workdir, generation, lang, "train") for lang in generation.new_languages}
    heldout = {lang: texts_for(workdir, generation, lang, "heldout") for lang in generation.new_languages}
    old_texts = {lang: texts_for(workdir, generation, lang, "heldout")
                 + texts_for(workdir, generation, lang, "train", limit=options.vocab_old_documents)
                 for lang in generation.old_languages}
    try:
        result = extend_tokenizer(tokenizer_json(tokenizer), new_texts, old_texts, options.new_tokens,
                                  heldout_texts=heldout, max_bytes_per_language=options.vocab_text_mb * 2**20,
                                  attach_marks=options.attach_marks)
    except VocabError as e:
        raise LayermoeError(f"--new-tokens: {e}") from None
    learned = result.report.new_tokens
    if learned < options.new_tokens:  # too little text for N: say what it allows rather than quietly learn fewer
        raise LayermoeError(f"--new-tokens {options.new_tokens:,}: the new languages' training text allows only {learned:,} "
                            f"new tokens (pairs seen at least twice that keep the old languages' tokens): ask for at most "
                            f"{learned:,}, or give more text")
    rows = add_token_rows(model, result.new_token_sources)
    return VocabularyStep(result, rows)


def record_vocabulary_rows(model, rows_before: int, generation_index: int) -> None:
    """`config.vocab_sizes`: the rows after each generation (G0 first), so training knows which rows are whose."""
    rows = model.get_input_embeddings().weight.shape[0]
    sizes = list(getattr(model.config, "vocab_sizes", None) or [rows_before] * generation_index)
    sizes = sizes[:generation_index] + [rows]
    model.config.vocab_sizes = sizes


def save_extended_tokenizer(step: VocabularyStep, checkpoint: Path) -> None:
    """The extended tokenizer in place of the base one (loaded as it is), and where each new token came from."""
    save_tokenizer(step.result.tokenizer_json, checkpoint, base_dir=checkpoint)
    sources = {str(token): ids for token, ids in sorted(step.result.new_token_sources.items())}
    atomic_write_text(checkpoint / SOURCES_FILE, json.dumps(sources) + "\n")


def vocabulary_record(step: VocabularyStep, options: ExpandOptions) -> dict:
    """What the manifest keeps of the step (the report, the settings, the rows)."""
    report = step.result.report.to_dict()
    return {"requested_new_tokens": options.new_tokens, "attach_marks": options.attach_marks,
            "vocab_text_mb": options.vocab_text_mb, "vocab_old_documents": options.vocab_old_documents,
            "rows": step.rows, "report": report}
