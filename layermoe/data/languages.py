"""Language codes: validate and normalise BCP 47 tags built on ISO 639-1 / 639-3.

`langcodes` ships the IANA registry as package data, so nothing here touches the network.
Normalisation maps 639-3 codes to their 639-1 form where one exists (`tur` -> `tr`,
`eng` -> `en`) and fixes case (`zh-hans` -> `zh-Hans`), so one language has one name
everywhere (manifest, data sources, reports).
"""

from __future__ import annotations

from layermoe.core.errors import LayermoeError

# Registered tags that do not name a language a model could learn.
_NOT_A_LANGUAGE = {"und", "mul", "zxx", "mis"}


def _unknown(code: str) -> LayermoeError:
    return LayermoeError(
        f"unknown language code {code!r}: use an ISO 639-1 or 639-3 code such as el, hu, tur "
        "(optionally with a script, e.g. zh-Hans)"
    )


def validate_language(code: str) -> str:
    """Return the normalised tag for `code` (`tur` -> `tr`, `zh-hans` -> `zh-Hans`), or raise LayermoeError."""
    import langcodes

    raw = code.strip() if isinstance(code, str) else ""
    if not raw:
        raise _unknown(str(code))
    try:
        tag = langcodes.Language.get(raw.replace("_", "-"))
    except (ValueError, langcodes.tag_parser.LanguageTagError):
        raise _unknown(code) from None
    if not tag.is_valid() or tag.language is None or tag.language in _NOT_A_LANGUAGE:
        raise _unknown(code)
    lang = tag.language
    if tag.private or tag.extensions or lang.startswith("x-") or (len(lang) == 3 and "qaa" <= lang <= "qtz"):
        # x-... and qaa..qtz are private use: valid tags, but no shared meaning.
        raise _unknown(code)
    return str(tag)


def base_language(code: str) -> str:
    """The language subtag alone: `zh-Hans` -> `zh`, `sr-Latn` -> `sr`."""
    import langcodes

    return langcodes.Language.get(validate_language(code)).language


def validate_language_group(codes: list[str], option: str) -> list[str]:
    """Validate and normalise the languages given to one option; a language listed twice is an error."""
    codes = [validate_language(code) for code in codes]
    if len(set(codes)) != len(codes):
        raise LayermoeError(f"{option} lists a language twice: {', '.join(codes)}")
    return codes


def parse_language_list(text: str) -> list[str]:
    """Parse `"en,zh,es"` into validated, normalised codes; empty items or duplicates are errors."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise LayermoeError(f"bad language list {text!r}: give comma-separated codes such as en,zh,es")
    codes: list[str] = []
    for item in items:
        code = validate_language(item)
        if code in codes:
            raise LayermoeError(f"language {code!r} is listed twice in {text!r}: list each language once")
        codes.append(code)
    return codes
