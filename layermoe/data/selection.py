"""`DataSelection`: which documents a training stage reads, as a pydantic model (torch-free).

- stage 1: the current generation's (new) languages; stage 2: those plus a replay of every
  earlier generation's (old) languages;
- a budget, in documents or tokens per language, stops the reading once met (documents chosen
  through a seeded shuffle buffer, `data/prepare.py`);
- stage 2 caps each new language at `docs_per_new_language` (authors: 100,000 documents) and each
  old one at `docs_per_old_language`, else `tokens_per_old_language`, else `replay_ratio` x the
  mean new-language document count (authors: 50,000 = 0.5 x 100,000); `replay_docs_by_generation`
  (or `replay_tokens_by_generation`) sets it per earlier generation instead.

`prepare` takes it directly; `TrainConfig` holds it as its `data` field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from layermoe.core.options import StepOptions, option
from layermoe.data.split import HELDOUT_FRACTION

SHUFFLE_BUFFER = 10_000  # documents
STAGE2_DOCS_PER_NEW_LANGUAGE = 100_000  # authors: 100k documents per new language ...
STAGE2_REPLAY_RATIO = 0.5  # ... and 50k per old language


class DataSelection(StepOptions):
    """Which documents a stage trains on (None: every training-side document)."""

    stage: Literal[1, 2] = 1
    seed: int = option(0, help="Seed of the document choice under a budget and of the packing order.")
    tokens_per_language: int | None = option(None, "--tokens-per-language", gt=0,
                                             help="Token budget per new language: reading stops once it is met.")
    docs_per_new_language: int | None = option(None, "--docs-per-new-language", gt=0,
                                               help="Document budget per new language (stage 2 default: 100,000).")
    tokens_per_old_language: int | None = option(None, "--tokens-per-old-language", gt=0,
                                                 help="Stage 2: token budget per replayed old language.")
    docs_per_old_language: int | None = option(None, "--docs-per-old-language", gt=0,
                                               help="Stage 2: document budget per replayed old language.")
    replay_ratio: float = option(STAGE2_REPLAY_RATIO, "--replay-ratio", ge=0,
                                 help="Stage 2: old-language documents = this x the mean new-language count (default 0.5).")
    # Stage 2, per earlier generation: documents (or tokens) per language of generation g, over the
    # settings above (the authors' G2 replays G1's languages at 100,000 and G0's at 50,000).
    replay_docs_by_generation: dict[int, int] | None = None
    replay_tokens_by_generation: dict[int, int] | None = None
    shuffle_buffer: int = Field(SHUFFLE_BUFFER, gt=0)
    heldout_fraction: float = Field(HELDOUT_FRACTION, gt=0, lt=1)

    @model_validator(mode="after")
    def _stage_defaults(self) -> "DataSelection":
        # Filled once, so that what is stored shows what was used.
        if self.stage == 2 and self.docs_per_new_language is None:
            object.__setattr__(self, "docs_per_new_language", STAGE2_DOCS_PER_NEW_LANGUAGE)
        return self

    def key_fields(self) -> dict:
        """The settings that decide the data (stage 1 has no replay)."""
        fields = self.model_dump(mode="json")
        if self.stage == 1:
            for name in ("tokens_per_old_language", "docs_per_old_language", "replay_ratio", "replay_docs_by_generation",
                         "replay_tokens_by_generation"):
                fields.pop(name)
        for name in ("replay_docs_by_generation", "replay_tokens_by_generation"):
            if fields.get(name) is None:
                fields.pop(name, None)  # unset: the key of data prepared before these settings existed
        return fields


# The fields a training config or a recipe's stage section sets (the rest are internal defaults).
SELECTION_FIELDS = ("seed", "tokens_per_language", "docs_per_new_language", "tokens_per_old_language",
                    "docs_per_old_language", "replay_ratio", "replay_docs_by_generation", "replay_tokens_by_generation")
