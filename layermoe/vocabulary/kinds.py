"""The tokenizers a vocabulary can be extended for, what the extension depends on in them, and the
optional pre-tokenizer fix that keeps combining marks with their letter (`attach_combining_marks`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_NEW_TOKENS_CAP = 65_536
"""Most new tokens one extension may add. Every new token is an embedding row (and an lm_head
row when untied) that must be trained; 64k already grows a 32k-128k vocabulary by half or
more, and on any realistic corpus merges beyond that are seen too rarely (a few hundred times
in tens of MB) to train their rows. Raise it deliberately, not by accident."""

DEFAULT_MAX_BYTES_PER_LANGUAGE = 32 * 2**20
"""Training text read per new language (UTF-8 bytes). BPE statistics saturate long before;
the cap keeps time and memory bounded and the languages balanced."""

DEFAULT_MIN_PAIR_COUNT = 2
REPORT_SAMPLE_DOCS = 2000  # first training documents per language kept to measure the train side
BATCH_DOCS = 1000  # documents per multi-threaded encode_batch call
SPACE_MARK = "\u2581"  # "▁": SentencePiece's space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Rejection reasons (keys of ExtensionReport.rejected)
R_OLD_ADJACENT = "pair adjacent in old-language text"
R_OLD_PRETOKEN = "string equals an old-language pre-token (ignore_merges)"
R_OLD_CHARACTER = "character occurs in old-language text"
R_EXISTS = "string already a token"
R_SHAPE = "shape the base vocabulary never uses (word boundary, whitespace, digits)"
R_DECOMPOSITION = "base tokenization of the string differs from its merge parts"
OLD_LANGUAGE_REASONS = (R_OLD_ADJACENT, R_OLD_PRETOKEN, R_OLD_CHARACTER)


class VocabError(ValueError):
    """Input we cannot use; the message is one line that says what and, where possible, the fix."""


# ---------------------------------------------------------------------------------------------
# What kind of tokenizer this is


@dataclass
class TokenizerInfo:
    """The facts about a tokenizer.json that the extension depends on."""

    kind: str  # "byte-level BPE" or "SentencePiece-style BPE (byte fallback)"
    vocab: dict[str, int]
    id_to_token: dict[int, str]
    added_ids: set[int]
    byte_ids: dict[int, int]  # byte-fallback token id -> byte value (empty for byte-level)
    next_id: int  # first free id after the model vocab and the added tokens
    ignore_merges: bool
    merges_as_strings: bool  # old "a b" merge format (else [a, b] pairs)
    shape: TokenShape

    @property
    def byte_fallback(self) -> bool:
        return bool(self.byte_ids)


@dataclass
class TokenShape:
    """Which token shapes the base vocabulary uses; new tokens follow it.

    Digits: a base that never merges digits (SmolLM2, Llama 2: every digit its own token) gets no
    merged digits either, or numbers in old-language text would change wherever a digit pair
    happens to be missing from the check sample. SentencePiece-style: `▁` only as the leading
    character (one, or a run if the base has "▁▁word" tokens) and no other whitespace, so no token
    spans a word boundary even when the whole text is one pre-token."""

    sentencepiece: bool
    multi_space_prefix: bool  # "▁▁word" tokens exist
    digits_merge: bool  # tokens of two or more characters containing a decimal digit exist

    def allows(self, s: str, text: str) -> bool:
        """`s` is the token in the model's alphabet, `text` what it decodes to."""
        if not self.digits_merge and len(text) > 1 and any(ch.isdecimal() for ch in text):
            return False
        if not self.sentencepiece:
            return True
        body = s.lstrip(SPACE_MARK)
        lead = len(s) - len(body)
        if not body or SPACE_MARK in body or any(ch.isspace() for ch in body):
            return False
        return lead <= 1 or self.multi_space_prefix


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: the byte each ByteLevel character stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_decoder()


def token_text(token: str, byte_level: bool) -> str:
    """What a token string stands for as text (partial UTF-8 bytes become U+FFFD)."""
    if not byte_level:
        return token.replace(SPACE_MARK, " ")
    return bytes(_BYTE_OF_CHAR.get(ch, 0x3F) for ch in token).decode("utf-8", errors="replace")


def _find_nodes(node, type_name: str) -> list[dict]:
    """Every pre-tokenizer/normalizer node of the given type, looking inside Sequences."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == type_name:
        return [node]
    found = []
    for child in node.get("pretokenizers", []) or node.get("normalizers", []) or []:
        found += _find_nodes(child, type_name)
    return found


def describe_tokenizer(tokenizer_json: dict) -> TokenizerInfo:
    """Check that the tokenizer is one we can extend and collect what the extension needs."""
    if not isinstance(tokenizer_json, dict) or not isinstance(tokenizer_json.get("model"), dict):
        raise VocabError("not a tokenizer.json: no 'model' section (convert tiktoken or SentencePiece .model files to a fast tokenizer first)")
    model = tokenizer_json["model"]
    model_type = model.get("type") or ("BPE" if "merges" in model else "unknown (no model type)")
    if model_type != "BPE":
        raise VocabError(f"unsupported tokenizer: a {model_type} model; only BPE (byte-level, or SentencePiece-style with byte_fallback) can be extended")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):  # None, "" and 0 mean unset
            raise VocabError(f"unsupported BPE option {option}={model[option]!r}: merges would not mean what plain BPE means")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise VocabError("unsupported tokenizer: the BPE model has no vocab")
    byte_level = bool(_find_nodes(tokenizer_json.get("pre_tokenizer"), "ByteLevel"))
    byte_ids = {}
    if not byte_level:
        if not model.get("byte_fallback"):
            raise VocabError("unsupported tokenizer: BPE with neither a ByteLevel pre-tokenizer nor byte_fallback (characters outside its vocab become unknown tokens)")
        byte_ids = {i: int(m.group(1), 16) for t, i in vocab.items() if (m := _BYTE_TOKEN.fullmatch(t))}
        if len(set(byte_ids.values())) < 256:
            raise VocabError(f"unsupported tokenizer: byte_fallback is on but only {len(byte_ids)} of the 256 <0xXX> byte tokens are in the vocab")
    merges_raw = model.get("merges") or []
    merges_as_strings = bool(merges_raw) and isinstance(merges_raw[0], str)
    byte_strings = {t for t, i in vocab.items() if i in byte_ids}
    if byte_strings:
        for merge in merges_raw:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            if a in byte_strings or b in byte_strings:
                raise VocabError(f"unsupported tokenizer: its merges combine byte-fallback tokens ({a!r} + {b!r})")
    added = tokenizer_json.get("added_tokens") or []
    added_ids = {t["id"] for t in added}
    id_to_token = {i: t for t, i in vocab.items()}
    for t in added:
        id_to_token.setdefault(t["id"], t["content"])
    plain = [token_text(t, byte_level) for t, i in vocab.items() if i not in byte_ids and i not in added_ids]
    shape = TokenShape(
        sentencepiece=not byte_level,
        multi_space_prefix=not byte_level and any(re.fullmatch(f"{SPACE_MARK}{{2,}}[^{SPACE_MARK}]+", t) for t in vocab),
        digits_merge=any(len(t) > 1 and any(ch.isdecimal() for ch in t) for t in plain),
    )
    return TokenizerInfo(
        kind="byte-level BPE" if byte_level else "SentencePiece-style BPE (byte fallback)",
        vocab=dict(vocab),
        id_to_token=id_to_token,
        added_ids=added_ids,
        byte_ids=byte_ids,
        next_id=max([*vocab.values(), *added_ids]) + 1,
        ignore_merges=bool(model.get("ignore_merges")),
        merges_as_strings=merges_as_strings,
        shape=shape,
    )


def load_tokenizer_json(path: str | os.PathLike) -> dict:
    """tokenizer.json from a file or a model folder; a folder with only a slow/tiktoken file is refused."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            others = sorted(p.name for p in path.iterdir() if p.suffix in (".model", ".tiktoken") or p.name in ("vocab.json", "vocab.txt"))
            what = f" (found {', '.join(others)})" if others else ""
            raise VocabError(f"no tokenizer.json in {path}{what}: only fast tokenizers (tokenizer.json) can be extended")
        path = path / "tokenizer.json"
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------
# Optional: let letters keep their combining marks (GPT-2-style regexes split Indic words)

_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LETTER_RUN = r"\p{L}+"
_LETTER_RUN_WITH_MARKS = r"\p{L}[\p{L}\p{M}]*"


def _rewrite_letter_runs(pattern: str) -> str:
    r"""`\p{L}+` outside character classes becomes `\p{L}[\p{L}\p{M}]*`; on text without a
    combining mark right after a letter the two match exactly the same strings."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if not in_class and pattern.startswith(_LETTER_RUN, i) and pattern[i + len(_LETTER_RUN):i + len(_LETTER_RUN) + 1] not in ("+", "?"):
                out.append(_LETTER_RUN_WITH_MARKS)
                i += len(_LETTER_RUN)
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)


def _patch_pre_tokenizer(node):
    """The node with its letter runs rewritten; ByteLevel's built-in GPT-2 regex becomes an explicit Split."""
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Sequence":
        children = []
        for child in node["pretokenizers"]:
            patched = _patch_pre_tokenizer(child)
            children += patched["pretokenizers"] if patched.get("type") == "Sequence" and child.get("type") != "Sequence" else [patched]
        return {**node, "pretokenizers": children}
    if node.get("type") == "Split" and "Regex" in node.get("pattern", {}):
        return {**node, "pattern": {"Regex": _rewrite_letter_runs(node["pattern"]["Regex"])}}
    if node.get("type") == "ByteLevel" and node.get("use_regex", True):
        if node.get("add_prefix_space"):
            raise VocabError("attach_combining_marks is not supported with ByteLevel(add_prefix_space=True)")
        split = {"type": "Split", "pattern": {"Regex": _rewrite_letter_runs(_GPT2_PATTERN)}, "behavior": "Isolated", "invert": False}
        return {"type": "Sequence", "pretokenizers": [split, {**node, "use_regex": False}]}
    return node


def attach_combining_marks(tokenizer_json: dict) -> tuple[dict, bool]:
    r"""(tokenizer_json with letter runs that keep their combining marks, whether anything changed).

    GPT-2, Llama 3 and Qwen regexes match words as `\p{L}+`; Devanagari/Bengali vowel signs
    are marks (\p{M}), so "शर्मा" is cut into four pre-tokens and no merge can ever join them
    (SmolLM2: Hindi can gain at most 1.69x bytes per token). The rewrite changes only text in
    which a letter is directly followed by a combining mark, so old languages written without
    such marks (English, Greek, Turkish, Hungarian in NFC) keep their pre-tokens; the
    verification checks it on the old texts anyway. Idempotent (lifelong use).
    """
    if not _find_nodes(tokenizer_json.get("pre_tokenizer"), "ByteLevel"):
        return tokenizer_json, False
    patched = {**tokenizer_json, "pre_tokenizer": _patch_pre_tokenizer(tokenizer_json["pre_tokenizer"])}
    return patched, patched["pre_tokenizer"] != tokenizer_json["pre_tokenizer"]
