"""The checks that make the guarantee a fact: old texts encoded by the real extended tokenizer equal
the base's ids, every id kept, decode(encode(x)) == x; and bytes per token before and after."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from layermoe.vocabulary.counting import text_batches, tokenizer_from_json
from layermoe.vocabulary.kinds import VocabError

# Verification and measurement with the real tokenizers


def _encode_all(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    ids = []
    for batch in text_batches(texts):
        ids += [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False)]
    return ids


@dataclass
class OldCheck:
    docs: int
    unchanged: int
    changed_by_language: dict[str, int]
    compression: dict[str, tuple]  # language -> (Compression before, after)

    @property
    def unchanged_share(self) -> float:
        return self.unchanged / self.docs if self.docs else 1.0


def compare_old_texts(base: Tokenizer, extended: Tokenizer, old_texts: Mapping[str, Sequence[str]]) -> OldCheck:
    """How many old check documents the extended tokenizer encodes to exactly the base ids."""
    docs = unchanged = 0
    changed: dict[str, int] = {}
    compressions: dict[str, tuple[Compression, Compression]] = {}
    for language, texts in old_texts.items():
        before, after = _encode_all(base, texts), _encode_all(extended, texts)
        same = sum(b == a for b, a in zip(before, after))
        docs += len(texts)
        unchanged += same
        if same < len(texts):
            changed[language] = len(texts) - same
        nbytes, words = sum(len(t.encode("utf-8")) for t in texts), sum(len(t.split()) for t in texts)
        compressions[language] = (Compression(nbytes, sum(map(len, before)), words),
                                  Compression(nbytes, sum(map(len, after)), words))
    return OldCheck(docs, unchanged, changed, compressions)


def check_ids_kept(base_json: dict, extended: Tokenizer, new_tokens: Mapping[int, str]) -> None:
    """Raise VocabError unless the loaded extended tokenizer keeps every base id (added tokens
    included) and gives each new token the id it was assigned."""
    expected = dict(base_json["model"]["vocab"])
    expected.update({t["content"]: t["id"] for t in base_json.get("added_tokens") or []})
    expected.update({string: token_id for token_id, string in new_tokens.items()})
    for content, token_id in expected.items():
        if extended.token_to_id(content) != token_id or extended.id_to_token(token_id) != content:
            raise VocabError(f"refusing the extension: token {content!r} would load as id {extended.token_to_id(content)}, not {token_id}")


def refuse_changed_old_texts(check: OldCheck) -> OldCheck:
    if check.changed_by_language:
        where = ", ".join(f"{lang}: {n}" for lang, n in sorted(check.changed_by_language.items()))
        raise VocabError(f"refusing the extension: it would change the tokens of {check.docs - check.unchanged} of {check.docs} old-language documents ({where})")
    return check


def refuse_marks_changing_old_texts(check: OldCheck) -> None:
    if check.changed_by_language:
        where = ", ".join(f"{lang}: {n}" for lang, n in sorted(check.changed_by_language.items()))
        raise VocabError(f"attach_marks would change the tokens of {check.docs - check.unchanged} of {check.docs} old-language documents ({where}), whose letters carry combining marks; extend without it")


def verify_old_texts_unchanged(base_json: dict, extended_json: dict, old_texts: Mapping[str, Sequence[str]]) -> OldCheck:
    """Raise VocabError unless every old check document keeps its base token ids."""
    return refuse_changed_old_texts(compare_old_texts(tokenizer_from_json(base_json), tokenizer_from_json(extended_json), old_texts))


def round_trip_failures(base: Tokenizer, extended: Tokenizer, texts: Sequence[str]) -> int:
    """Documents whose decode(encode(text)) is neither the text nor what the base tokenizer gives back."""
    failures = 0
    for batch in text_batches(texts):
        ext_ids = [e.ids for e in extended.encode_batch(batch, add_special_tokens=False)]
        ext_text = extended.decode_batch(ext_ids)
        suspects = [k for k, t in enumerate(ext_text) if t != batch[k]]
        if suspects:
            base_ids = [e.ids for e in base.encode_batch([batch[k] for k in suspects], add_special_tokens=False)]
            base_text = base.decode_batch(base_ids)
            failures += sum(ext_text[k] != bt for k, bt in zip(suspects, base_text))
    return failures


@dataclass
class Compression:
    bytes: int
    tokens: int
    words: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else 0.0


def compression(tokenizer: Tokenizer, texts: Sequence[str]) -> Compression:
    """UTF-8 bytes, tokens (no special tokens) and whitespace-separated words of the texts."""
    tokens = sum(len(ids) for ids in _encode_all(tokenizer, texts))
    return Compression(sum(len(t.encode("utf-8")) for t in texts), tokens, sum(len(t.split()) for t in texts))


def compare_compression(base: Tokenizer, extended: Tokenizer, texts: Sequence[str]) -> dict:
    return compression_entry(len(texts), compression(base, texts), compression(extended, texts))


def compression_entry(docs: int, before: Compression, after: Compression) -> dict:
    return {
        "docs": docs,
        "bytes_per_token_before": round(before.bytes_per_token, 3),
        "bytes_per_token_after": round(after.bytes_per_token, 3),
        "ratio": round(after.bytes_per_token / before.bytes_per_token, 3) if before.tokens and after.tokens else None,
        "tokens_per_word_before": round(before.tokens_per_word, 3),
        "tokens_per_word_after": round(after.tokens_per_word, 3),
    }


# ---------------------------------------------------------------------------------------------
# The entry point
