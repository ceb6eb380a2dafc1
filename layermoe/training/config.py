"""`TrainConfig`: every knob of one training stage, as a pydantic model (torch-free).

`layermoe train` fills it from a recipe YAML and its flags (each field with a flag below is one
on the command line, declared here once), and the manifest stores `.model_dump()`, so every
field is plain JSON and unknown keys are rejected (a typo in a recipe must not silently train
with a default). The data selection is one nested field, `data` (`DataSelection`); a recipe may
write its fields flat (`tokens_per_language: ...` beside `learning_rate`), and the stored dump
keeps them flat, as before the nesting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_serializer, model_validator

from layermoe.core.errors import LayermoeError
from layermoe.core.options import StepOptions, first_error, option
from layermoe.data.selection import SELECTION_FIELDS, DataSelection

# Paper / authors' defaults (METHOD.md section 4).
STAGE_SEQ_LEN = {1: 1024, 2: 512}


class TrainConfig(StepOptions):
    stage: Literal[1, 2]
    learning_rate: float = option(5e-5, "--lr", gt=0, help="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # used when warmup_steps == 0
    # Length of training: max_steps wins, then token_budget, else `epochs` passes over the data.
    max_steps: int | None = option(None, "--max-steps", gt=0, help="Optimizer steps (default: one pass over the data).")
    token_budget: int | None = option(None, "--token-budget", gt=0, help="Stop after this many training tokens.")
    epochs: float = Field(1.0, gt=0)
    seq_len: int | None = option(None, "--seq-len", gt=1, help="Tokens per training sequence (default: 1024 in stage 1, 512 in stage 2).")
    micro_batch_size: int = option(8, "--micro-batch", gt=0, help="Sequences per process and forward pass.")
    grad_accum_steps: int = option(1, "--grad-accum", gt=0, help="Micro-batches per optimizer step.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", help="auto | bf16 | fp32")  # auto: bf16 on GPU
    seed: int = option(0, help="Seed of the training run (and of the data choice, unless the data sets its own).")
    alpha: float = Field(0.01, ge=0)  # load balancing (stage 1)
    beta: float = Field(0.1, ge=0)  # LPR (stage 2)
    gamma: float = Field(0.1, ge=0)  # routing classifier (stage 2)
    # The authors' operating points, as options (README, "Paper setting vs layermoe default"):
    balance_form: Literal["switch-normalised", "mixtral"] = "switch-normalised"  # mixtral: k x ours at one alpha
    lpr_form: Literal["nll", "authors"] = "nll"  # authors: cross-entropy of the probabilities (double softmax)
    lpr_tokens: Literal["earlier", "g0"] = "earlier"  # g0: only G0's tokens get the prior (the authors' G2)
    # Sequences per optimizer step over all processes; the accumulation follows from the launch
    # (global = micro_batch_size x grad_accum_steps x processes). None: grad_accum_steps as given.
    global_batch_sequences: int | None = option(None, "--global-batch", gt=0,
                                                help="Sequences per optimizer step over every process (the accumulation follows).")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    checkpoint_every: int = option(500, "--checkpoint-every", ge=0, help="Optimizer steps between resumable checkpoints (0: none).")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = option(10, "--log-every", gt=0, help="Optimizer steps per logged point (train_log.jsonl, trackers; the last step always).")
    gradient_checkpointing: bool = False
    report_to: str = option("auto", "--report-to", help="Experiment trackers: tensorboard, wandb, mlflow (comma-separated), all, none, or auto (tensorboard when installed). wandb offline: WANDB_MODE=offline.")
    # NCCL's default is 10 minutes; a rank 0 writing a large checkpoint can take longer.
    process_group_timeout_minutes: int = option(60, "--process-group-timeout", gt=0, help="Minutes a collective call may wait for a slow rank (default 60).")
    data: DataSelection = Field(default_factory=DataSelection)

    @model_validator(mode="before")
    @classmethod
    def _nest_data_fields(cls, values: Any) -> Any:
        """Flat data keys (`tokens_per_language: ...`) go into `data`, which gets the stage's number."""
        if not isinstance(values, dict):
            return values
        values = nest_data_settings(values)
        data = values["data"]
        unknown = sorted(set(data) - set(SELECTION_FIELDS) - {"stage"})
        if unknown:
            raise ValueError(f"data has no setting {unknown[0]!r} (it takes {', '.join(SELECTION_FIELDS)})")
        data["stage"] = values.get("stage", data.get("stage"))
        return values

    @model_validator(mode="after")
    def _stage_defaults(self) -> "TrainConfig":
        # Fill stage-dependent defaults once, so the stored dump shows what was really used.
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", STAGE_SEQ_LEN[self.stage])
        if "seed" not in self.data.model_fields_set:  # the data's choice follows the run's seed unless set
            object.__setattr__(self.data, "seed", self.seed)
        return self

    def for_world_size(self, world_size: int) -> "TrainConfig":
        """This config with `grad_accum_steps` derived from `global_batch_sequences` for `world_size` processes."""
        if self.global_batch_sequences is None:
            return self
        per_step = self.micro_batch_size * world_size
        if self.global_batch_sequences % per_step:
            raise LayermoeError(
                f"a global batch of {self.global_batch_sequences:,} sequences is not a whole number of micro-batches of "
                f"{self.micro_batch_size} on {world_size} process{'es' if world_size > 1 else ''} ({per_step} per "
                f"accumulation step): choose a global batch divisible by {per_step}, or another --micro-batch")
        return self.model_copy(update={"grad_accum_steps": self.global_batch_sequences // per_step})

    def explicit_data_settings(self) -> set[str]:
        """The data settings given explicitly (the run's seed counts for the data's)."""
        given = set(self.data.model_fields_set) - {"stage"}
        return given | ({"seed"} if "seed" in self.model_fields_set else set())

    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict:
        """The data fields beside the others, as the manifest has always stored them."""
        out = handler(self)
        data = out.pop("data")
        if data.get("seed") != out["seed"]:
            out["data_seed"] = data["seed"]
        out.update({name: data[name] for name in SELECTION_FIELDS if name != "seed"})
        return out

    @property
    def trainable_fingerprint(self) -> dict:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        skip = {"checkpoint_every", "keep_checkpoints", "log_every", "report_to", "process_group_timeout_minutes"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


def read_recipe_settings(recipe: str | Path) -> dict:
    """The TrainConfig fields of a training recipe YAML (a mapping), checked to be readable."""
    import yaml  # lazy: only a command given --recipe reads YAML

    path = Path(recipe)
    if not path.is_file():
        raise LayermoeError(f"training recipe not found: {path}; pass an existing YAML file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LayermoeError(f"training recipe {path} is not a text file (byte {e.start:,} is not UTF-8): "
                            "pass a YAML file") from None
    except yaml.YAMLError as e:
        raise LayermoeError(f"training recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is None:
        raise LayermoeError(f"training recipe {path} is empty: write TrainConfig fields in it (e.g. max_steps: 1000), "
                            "or leave --recipe out")
    if not isinstance(loaded, dict):
        raise LayermoeError(f"training recipe {path} must be a YAML mapping of TrainConfig fields")
    return loaded


def nest_data_settings(values: dict) -> dict:
    """A copy of `values` with its flat data keys (and `data_seed`, of a stored dump) moved into `data`."""
    values = dict(values)
    nested = values.pop("data", None)
    data = nested.model_dump(exclude_unset=True) if isinstance(nested, DataSelection) else dict(nested or {})
    for name in SELECTION_FIELDS:
        if name in values and name != "seed":
            data[name] = values.pop(name)
    if "data_seed" in values:  # a stored dump whose data seed differs from the training seed
        data["seed"] = values.pop("data_seed")
    values["data"] = data
    return values


def merge_settings(base: dict, overrides: dict) -> dict:
    """`overrides` over `base` (flat or nested data keys alike), the data merged key by key (None = unset)."""
    base, overrides = nest_data_settings(base), nest_data_settings(overrides)
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None and k != "data"}}
    merged["data"] = {**base["data"], **{k: v for k, v in overrides["data"].items() if v is not None}}
    return merged


def load_train_config(recipe: str | Path | None = None, **overrides) -> TrainConfig:
    """A `TrainConfig` from an optional YAML recipe plus overrides (overrides win; None = unset)."""
    values = merge_settings(read_recipe_settings(recipe) if recipe is not None else {}, overrides)
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        where, message = first_error(err)
        raise LayermoeError(f"bad training setting {where or 'config'}: {message}") from None
