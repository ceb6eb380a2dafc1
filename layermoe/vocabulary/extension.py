"""`extend_tokenizer`: the whole extension of a tokenizer for new languages, with its report."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from layermoe.vocabulary.checks import (
    check_ids_kept,
    compare_compression,
    compare_old_texts,
    compression_entry,
    refuse_changed_old_texts,
    refuse_marks_changing_old_texts,
    round_trip_failures,
)
from layermoe.vocabulary.counting import (
    count_words,
    model_only_tokenizer,
    old_language_constraints,
    tokenizer_from_json,
)
from layermoe.vocabulary.kinds import (
    DEFAULT_MAX_BYTES_PER_LANGUAGE,
    DEFAULT_MIN_PAIR_COUNT,
    MAX_NEW_TOKENS_CAP,
    OLD_LANGUAGE_REASONS,
    VocabError,
    attach_combining_marks,
    describe_tokenizer,
)
from layermoe.vocabulary.learning import MergeLearner, NewToken, extended_tokenizer_json


@dataclass
class ExtensionReport:
    kind: str
    requested_new_tokens: int
    new_tokens: int
    new_merges: int
    new_characters: int
    first_new_id: int | None
    last_new_id: int | None
    stop_reason: str
    rejected: dict[str, int]  # reason -> distinct candidates rejected when they were the best one left
    rejected_by_old_languages: int
    pre_tokenizer_patched: bool
    old_docs_checked: int
    old_docs_unchanged: int
    old_unchanged_share: float
    round_trip_docs: int
    round_trip_failures: int
    languages: dict[str, dict]  # per new language: data read, tokens learned, train/held-out compression
    old_languages: dict[str, dict]  # per old language: compression before/after (identical)
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExtensionResult:
    tokenizer_json: dict
    new_token_sources: dict[int, list[int]]  # new id -> the base token ids it replaces (embedding init)
    new_tokens: list[NewToken]
    report: ExtensionReport


def _check_arguments(new_texts, old_texts, max_new_tokens, max_bytes_per_language, min_pair_count) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise VocabError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise VocabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens > MAX_NEW_TOKENS_CAP:
        raise VocabError(f"max_new_tokens {max_new_tokens} is above the cap of {MAX_NEW_TOKENS_CAP}: every new token is an embedding row to train, and merges that rare cannot be trained")
    if isinstance(max_bytes_per_language, bool) or not isinstance(max_bytes_per_language, int) or max_bytes_per_language <= 0:
        raise VocabError(f"max_bytes_per_language must be a positive integer, got {max_bytes_per_language!r}")
    if isinstance(min_pair_count, bool) or not isinstance(min_pair_count, int) or min_pair_count < 2:
        raise VocabError(f"min_pair_count must be an integer of at least 2, got {min_pair_count!r}")
    if not new_texts:
        raise VocabError("no new-language texts given")
    if not old_texts or not any(len(t) for t in old_texts.values()):
        raise VocabError("no old-language check texts given: without them nothing protects the old languages")
    both = sorted(set(new_texts) & set(old_texts))
    if both:
        raise VocabError(f"language(s) {', '.join(both)} given as both new and old")


def extend_tokenizer(
    tokenizer_json: dict,
    new_texts: Mapping[str, Iterable[str]],
    old_texts: Mapping[str, Sequence[str]],
    max_new_tokens: int,
    *,
    heldout_texts: Mapping[str, Sequence[str]] | None = None,
    max_bytes_per_language: int = DEFAULT_MAX_BYTES_PER_LANGUAGE,
    min_pair_count: int = DEFAULT_MIN_PAIR_COUNT,
    attach_marks: bool = False,
) -> ExtensionResult:
    """Add up to `max_new_tokens` tokens learned from `new_texts` (language -> training texts,
    read lazily up to `max_bytes_per_language` each) such that every text in `old_texts`
    (language -> held-out texts plus a fixed sample of training texts) keeps its exact ids.

    Fewer tokens than asked are learned when the data has no more pairs seen at least
    `min_pair_count` times (the report says so); none at all is an error. `heldout_texts`
    (new language -> held-out texts) only feeds the report. `attach_marks` first lets letters
    keep their combining marks in GPT-2-style pre-tokenizer regexes (see attach_combining_marks).
    Raises VocabError, one line, for bad input or when any old check text would change.
    """
    started = time.perf_counter()
    _check_arguments(new_texts, old_texts, max_new_tokens, max_bytes_per_language, min_pair_count)
    working_json, patched = attach_combining_marks(tokenizer_json) if attach_marks else (tokenizer_json, False)
    info = describe_tokenizer(working_json)
    working = tokenizer_from_json(working_json)
    base = tokenizer_from_json(tokenizer_json) if patched else working

    if patched:
        refuse_marks_changing_old_texts(compare_old_texts(base, working, old_texts))

    languages = list(new_texts)
    per_language = {lang: count_words(working, info, new_texts[lang], max_bytes_per_language) for lang in languages}
    empty = [lang for lang in languages if not per_language[lang].docs]
    if empty:
        raise VocabError(f"new language(s) {', '.join(empty)} have no text")
    counted = time.perf_counter()

    learner = _learner(working, info, languages, per_language, old_texts, min_pair_count)
    learned = learner.learn(max_new_tokens)
    if not learned:
        raise VocabError(f"nothing to learn: no token pair occurs at least {min_pair_count} times in the new-language text that the old languages allow; give more text")
    learned_at = time.perf_counter()

    extended_json = extended_tokenizer_json(working_json, info, learned, learner.strings)
    extended = tokenizer_from_json(extended_json)
    check_ids_kept(tokenizer_json, extended, {t.id: t.string for t in learned})
    check = refuse_changed_old_texts(compare_old_texts(base, extended, old_texts))
    # old texts keep their ids, so they decode as before: the round trip is checked on the new ones
    round_trip_texts = [t for lang in languages for t in per_language[lang].sample]
    round_trip_texts += [t for texts in (heldout_texts or {}).values() for t in texts]
    failures = round_trip_failures(base, extended, round_trip_texts)
    if failures:
        raise VocabError(f"refusing the extension: {failures} documents no longer decode to what the base tokenizer gives back")
    verified = time.perf_counter()

    report = _report(info, max_new_tokens, learned, learner, patched, check, len(round_trip_texts), failures,
                     languages, per_language, old_texts, heldout_texts or {}, base, extended, min_pair_count)
    seconds = {"counting": counted - started, "learning": learned_at - counted,
               "verification": verified - learned_at, "report": time.perf_counter() - verified,
               "total": time.perf_counter() - started}
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    return ExtensionResult(extended_json, {t.id: t.sources for t in learned}, learned, report)


def _learner(working, info, languages, per_language, old_texts, min_pair_count) -> MergeLearner:
    """The BPE continuation over every new language's words (words that cannot change are left out)."""
    old = old_language_constraints(working, info, old_texts)
    words, counts, langs = [], [], []
    for index, lang in enumerate(languages):
        for word, n in per_language[lang].words.items():
            if len(word) > 1:  # a one-token word has no pair and spells no multi-byte character
                words.append(list(word))
                counts.append(n)
                langs.append(index)
    return MergeLearner(words, counts, langs, languages, info, old, model_only_tokenizer(working), min_pair_count)


def _report(info, requested, learned, learner, patched, check, round_trip_docs, failures,
            languages, per_language, old_texts, heldout_texts, base, extended, min_pair_count) -> ExtensionReport:
    if len(learned) == requested:
        stop = f"reached max_new_tokens ({requested})"
    else:
        stop = f"learned {len(learned)} of {requested}: no other pair occurs at least {min_pair_count} times in the new-language text that the old languages allow"
    by_language = Counter(t.language for t in learned)
    languages_report = {}
    for lang in languages:
        counts = per_language[lang]
        entry = {"docs_read": counts.docs, "bytes_read": counts.bytes, "budget_reached": counts.budget_reached,
                 "distinct_words": len(counts.words), "new_tokens_learned_mainly_from": by_language.get(lang, 0),
                 "train_sample": compare_compression(base, extended, counts.sample)}
        if heldout_texts.get(lang):
            entry["heldout"] = compare_compression(base, extended, heldout_texts[lang])
        languages_report[lang] = entry
    return ExtensionReport(
        kind=info.kind,
        requested_new_tokens=requested,
        new_tokens=len(learned),
        new_merges=sum(not t.is_character for t in learned),
        new_characters=sum(t.is_character for t in learned),
        first_new_id=learned[0].id if learned else None,
        last_new_id=learned[-1].id if learned else None,
        stop_reason=stop,
        rejected=dict(learner.rejected),
        rejected_by_old_languages=sum(learner.rejected[r] for r in OLD_LANGUAGE_REASONS),
        pre_tokenizer_patched=patched,
        old_docs_checked=check.docs,
        old_docs_unchanged=check.unchanged,
        old_unchanged_share=check.unchanged_share,
        round_trip_docs=round_trip_docs,
        round_trip_failures=failures,
        languages=languages_report,
        old_languages={lang: compression_entry(len(old_texts[lang]), *pair) for lang, pair in check.compression.items()},
        seconds={},
    )


# ---------------------------------------------------------------------------------------------
