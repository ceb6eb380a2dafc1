"""`TrainConfig`: every knob of one training stage, as a pydantic model.

The CLI fills it from flags or a recipe YAML and stores `.model_dump()` in the manifest,
so every field is plain JSON and unknown keys are rejected (a typo in a recipe must not
silently train with a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from layermoe.core.errors import LayermoeError

# Paper / authors' defaults (METHOD.md section 4).
STAGE_SEQ_LEN = {1: 1024, 2: 512}
STAGE2_DOCS_PER_NEW_LANGUAGE = 100_000  # authors: 100k documents per new language ...
STAGE2_REPLAY_RATIO = 0.5  # ... and 50k per old language


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    stage: Literal[1, 2]
    learning_rate: float = Field(5e-5, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # used when warmup_steps == 0
    # Length of training: max_steps wins, then token_budget, else `epochs` passes over the data.
    max_steps: int | None = Field(None, gt=0)
    token_budget: int | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    seq_len: int | None = Field(None, gt=1)  # None -> 1024 in stage 1, 512 in stage 2
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0
    alpha: float = Field(0.01, ge=0)  # load balancing (stage 1)
    beta: float = Field(0.1, ge=0)  # LPR (stage 2)
    gamma: float = Field(0.1, ge=0)  # routing classifier (stage 2)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    checkpoint_every: int = Field(500, ge=0)  # optimizer steps; 0: no intermediate checkpoints
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    gradient_checkpointing: bool = False
    # Experiment trackers through accelerate: tensorboard, wandb, mlflow (comma-separated), all,
    # none, or auto (tensorboard when installed). wandb offline: WANDB_MODE=offline.
    report_to: str = "auto"
    # How long a collective call may wait for a slow rank before the job is killed (NCCL's
    # default is 10 minutes; a rank 0 writing a large checkpoint can take longer).
    process_group_timeout_minutes: int = Field(60, gt=0)
    # Data mix (layermoe.data.prepare; these fields are its `Selection`). None = every
    # document. A budget stops the reading once met (documents chosen through a seeded shuffle
    # buffer). In stage 2 the default is the authors' 100k documents per new language; old
    # languages get docs_per_old_language, else tokens_per_old_language, else replay_ratio x
    # the mean new-language document count.
    tokens_per_language: int | None = Field(None, gt=0)  # new languages
    docs_per_new_language: int | None = Field(None, gt=0)
    tokens_per_old_language: int | None = Field(None, gt=0)
    docs_per_old_language: int | None = Field(None, gt=0)
    replay_ratio: float = Field(STAGE2_REPLAY_RATIO, ge=0)

    @model_validator(mode="after")
    def _stage_defaults(self) -> "TrainConfig":
        # Fill stage-dependent defaults once, so the stored dump shows what was really used.
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", STAGE_SEQ_LEN[self.stage])
        if self.stage == 2 and self.docs_per_new_language is None:
            object.__setattr__(self, "docs_per_new_language", STAGE2_DOCS_PER_NEW_LANGUAGE)
        return self

    @property
    def trainable_fingerprint(self) -> dict:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        skip = {"checkpoint_every", "keep_checkpoints", "log_every", "report_to", "process_group_timeout_minutes"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


def load_train_config(recipe: str | Path | None = None, **overrides) -> TrainConfig:
    """Build a `TrainConfig` from an optional YAML recipe plus overrides (overrides win; None = unset)."""
    import yaml
    from pydantic import ValidationError

    values: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise LayermoeError(f"training recipe not found: {path}; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LayermoeError(f"training recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise LayermoeError(f"training recipe {path} must be a YAML mapping of TrainConfig fields")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise LayermoeError(f"bad training setting {where}: {first['msg']}") from None
