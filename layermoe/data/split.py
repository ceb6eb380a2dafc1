"""The held-out split: which documents training never sees.

A document is held out when the blake2b hash of its UTF-8 text, read as a number in [0, 1),
is below `fraction` (5% by default). The rule looks at nothing but the text, so it is the
same in every run, for any order of the documents, and works while streaming; duplicates of
one text always land on the same side. So that both sides are usable, a source with at least
two distinct documents always has one of each: if no document hashes below `fraction`, the
one with the smallest hash is held out; if every document does, the one with the largest hash
goes to training (`split_fixup`, which usually reads only the first few dozen documents).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout", "all")


def _unit_hash(text: str) -> float:
    """blake2b of the UTF-8 text as a number in [0, 1): stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_heldout(text: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """The hash rule alone (see the module docstring for the at-least-one-each fix-up)."""
    return _unit_hash(text) < fraction


def _split_fixup(documents: Iterable[str], fraction: float) -> tuple[str | None, str | None]:
    """(text forced to held-out, text forced to train) so that both sides are non-empty.

    Stops reading as soon as both sides have a document, which for a real corpus is after a
    few dozen documents; only small or lopsided sources are read to the end.
    """
    smallest_train: tuple[float, str] | None = None  # the train doc nearest the held-out region
    largest_heldout: tuple[float, str] | None = None
    train_texts: set[str] = set()  # up to two distinct texts: can the side spare one?
    heldout_texts: set[str] = set()
    for text in documents:
        h = _unit_hash(text)
        if h < fraction:
            if len(heldout_texts) < 2:
                heldout_texts.add(text)
            if largest_heldout is None or h > largest_heldout[0]:
                largest_heldout = (h, text)
        else:
            if len(train_texts) < 2:
                train_texts.add(text)
            if smallest_train is None or h < smallest_train[0]:
                smallest_train = (h, text)
        if largest_heldout is not None and smallest_train is not None:
            return None, None
    if len(train_texts) >= 2:
        return smallest_train[1], None
    if len(heldout_texts) >= 2:
        return None, largest_heldout[1]
    return None, None


@dataclass(frozen=True)
class SplitRule:
    """One side of one source's split: the hash rule plus the source's fix-up texts."""

    side: str  # "train", "heldout" or "all"
    fraction: float = HELDOUT_FRACTION
    force_heldout: str | None = None
    force_train: str | None = None

    def keeps(self, text: str) -> bool:
        if self.side == "all":
            return True
        held = (is_heldout(text, self.fraction) or text == self.force_heldout) and text != self.force_train
        return held == (self.side == "heldout")

    def filter(self, texts: list[str]) -> list[str]:
        return texts if self.side == "all" else [t for t in texts if self.keeps(t)]
