"""Old/new language averages and before/after deltas, as pure functions over plain dicts.

A language's generation is the expansion that taught it: 0 for the base model's own (G0)
languages, g for those added by expansion g. Seen from generation `current`:
old = generation < current (what must not be forgotten), new = generation == current.
Averages are unweighted means over languages, as the paper averages benchmark scores.
"""

from __future__ import annotations

from layermoe.core.errors import LayermoeError


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generation_of(language: str, generation_of_language: dict[str, int]) -> int:
    if language not in generation_of_language:
        known = ", ".join(sorted(generation_of_language)) or "none"
        raise LayermoeError(f"language '{language}' belongs to no generation (known languages: {known}): add it to a generation or drop its data")
    return int(generation_of_language[language])


def group_averages(
    bpb_by_lang: dict[str, float], generation_of_language: dict[str, int], current_generation: int
) -> dict:
    """{"old_avg", "new_avg", "by_generation": {g: mean}}; an empty group averages to None.

    Languages of a later generation than `current_generation` count only in `by_generation`.
    """
    old, new = [], []
    by_generation: dict[int, list[float]] = {}
    for language, value in bpb_by_lang.items():
        g = generation_of(language, generation_of_language)
        by_generation.setdefault(g, []).append(value)
        if g < current_generation:
            old.append(value)
        elif g == current_generation:
            new.append(value)
    return {
        "old_avg": _mean(old),
        "new_avg": _mean(new),
        "by_generation": {g: _mean(v) for g, v in sorted(by_generation.items())},
    }


def deltas(current: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """current - base for every language in both. For bpb, positive = worse (forgetting), negative = gain."""
    return {language: current[language] - base[language] for language in current if language in base}


def forgetting_and_gain(
    current: dict[str, float],
    base: dict[str, float],
    generation_of_language: dict[str, int],
    current_generation: int,
) -> dict:
    """Mean bpb rise on old languages ("forgetting", > 0 is bad) and mean bpb drop on new ones ("gain", > 0 is good)."""
    change = deltas(current, base)
    old = [d for lang, d in change.items() if generation_of(lang, generation_of_language) < current_generation]
    new = [-d for lang, d in change.items() if generation_of(lang, generation_of_language) == current_generation]
    return {"forgetting": _mean(old), "gain": _mean(new)}
