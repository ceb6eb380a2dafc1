"""The versioned expansion manifest: `<workdir>/manifest.json`.

One pydantic model holds the whole lineage: the base model, and per generation the
languages, the data, and one record per pipeline step. It knows nothing of torch.
Every path in it is relative to the work dir, so a work dir can be copied elsewhere.

`generations[0]` is G0, the base model's own languages (its `eval` caches the base
model's figures); `generations[g]` for g >= 1 is the g-th expansion.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layermoe import __version__
from layermoe.core.errors import LayermoeError

SCHEMA_VERSION = 2

# The step graph, in one place. Each step of a generation, in running order, with the steps of
# the same generation whose outputs it is built on; the steps that make a model (MODEL_STEPS)
# are also what every step of the next generations is built on. A new step is one line here
# (plus its record field on `Generation`).
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "profile": (),
    "allocation": ("profile",),
    "expansion": ("allocation",),
    "prepare1": ("expansion",),  # the tokenizer is the expanded checkpoint's; sources come with the profile
    "stage1": ("expansion", "prepare1"),
    "prepare2": ("expansion",),
    "stage2": ("stage1", "prepare2"),
    "eval": ("expansion", "stage1", "stage2"),  # it measures the newest model of its generation
}
STEP_NAMES = tuple(STEP_INPUTS)
MODEL_STEPS = ("expansion", "stage1", "stage2")


def describe_steps(steps: list[tuple[int, str]]) -> str:
    """[(1, "stage2"), (1, "eval"), (2, "profile"), ...] -> "stage2 and eval of G1, and every step of G2"."""
    groups: dict[int, list[str]] = {}
    for index, name in steps:
        groups.setdefault(index, []).append(name)

    def listing(names: list[str]) -> str:
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    parts = [f"every step of G{index}" if set(names) == set(STEP_NAMES) else f"{listing(names)} of G{index}"
             for index, names in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class StepStatus(str, Enum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


class _Record(BaseModel):
    # Unknown keys are kept, so a manifest written by a newer patch release round-trips.
    model_config = ConfigDict(extra="allow")


class StepRecord(_Record):
    status: StepStatus = StepStatus.pending
    config: dict[str, Any] = Field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outputs: dict[str, str] = Field(default_factory=dict)  # name -> path relative to the work dir
    metrics: dict[str, Any] = Field(default_factory=dict)
    pid: int | None = None
    host: str | None = None
    error: str | None = None


class FileChecksum(_Record):
    """One file a step wrote, as it was written (see integrity.py)."""

    sha256: str
    size: int | None = None
    tensors: dict[str, str] = Field(default_factory=dict)  # safetensors: tensor -> short digest of its bytes


class ProfileRecord(StepRecord):
    languages: list[str] = Field(default_factory=list)
    similarity: list[float] | None = None  # S^i per layer (Eq. 9)
    new_new: list[float] | None = None
    new_old: list[float] | None = None
    matrix: list[list[list[float]]] | None = None  # [layer][language][language], Eq. 8
    tokens_per_language: dict[str, int] = Field(default_factory=dict)
    model_sha256: dict[str, str] = Field(default_factory=dict)
    # Language-specific FFN neurons (NeuronMoE): unique neurons per layer among the languages' top-N.
    neuron_counts: list[int] | None = None
    neuron_counts_by_language: dict[str, list[int]] = Field(default_factory=dict)
    neuron_top_n: int | None = None
    neuron_documents: dict[str, int] = Field(default_factory=dict)
    # Expanded models: per language, layer and expert, the routing weight its tokens put there.
    routing_mass: dict[str, list[list[float]]] | None = None


class AllocationRecord(StepRecord):
    strategy: str | None = None
    budget: int | None = None
    rounding: str | None = None
    neuron_mapping: str | None = None  # strategy "neuron": proportional (budget-bound) | linear (the authors')
    experts_per_layer: list[int] | None = None  # totals including expert 0 (Eq. 10's N^i)
    new_experts_per_layer: list[int] | None = None
    classifier_layers: list[int] = Field(default_factory=list)
    overshoot: int = 0
    new_parameters: int | None = None
    uniform_new_parameters: int | None = None


class ExpansionRecord(StepRecord):
    checkpoint: str | None = None
    checkpoint_files: dict[str, FileChecksum] = Field(default_factory=dict)  # verified whenever the model is read
    expert_init: str | None = None  # expert0 | routed (G2+)
    expert_sources: list[int] | None = None  # per layer, the existing expert the new ones copy
    max_abs_logit_diff: float | None = None
    total_parameters: int | None = None
    active_parameters: int | None = None
    added_parameters: int | None = None


class PrepareRecord(StepRecord):
    """A stage's training data, read, split, tokenised and packed once (`layermoe prepare`)."""

    key: str | None = None  # cache key: the sources' identity, the tokenizer, the settings
    data_dir: str | None = None  # the prepared directory
    documents_per_language: dict[str, int] = Field(default_factory=dict)
    tokens_per_language: dict[str, int] = Field(default_factory=dict)


class TrainRecord(StepRecord):
    checkpoint: str | None = None
    checkpoint_files: dict[str, FileChecksum] = Field(default_factory=dict)  # verified whenever the model is read
    steps: int | None = None
    tokens_seen: int | None = None
    final_losses: dict[str, float] = Field(default_factory=dict)
    frozen_checksums: dict[str, str] = Field(default_factory=dict)


class LanguageEval(_Record):
    bpb: float
    token_ppl: float | None = None
    tokens: int | None = None
    bytes: int | None = None


class NamedTestSet(LanguageEval):
    """A test set the user named with `eval --data LANG=SPEC`, measured in full."""

    language: str
    source: str  # the SPEC: builtin, hf:..., or a path relative to the work dir
    kind: str
    sha256: str | None = None  # of the source (data.describe_source)
    transfer: bool = False  # a language no generation of the lineage learned


class EvalRecord(StepRecord):
    model: str | None = None
    languages: dict[str, LanguageEval] = Field(default_factory=dict)
    test_sets: dict[str, NamedTestSet] = Field(default_factory=dict)  # "LANG=SPEC" -> figures
    old_avg: float | None = None
    new_avg: float | None = None
    routing: dict[str, Any] | None = None
    lm_eval: dict[str, Any] | None = None


class DataSourceRecord(_Record):
    spec: str  # "builtin", "hf:NAME...", or a path relative to the work dir
    absolute_path: str | None = None  # a file source's absolute path, tried when `spec` does not resolve
    kind: str
    sha256: str
    documents: int | None = None
    text_field: str = "text"


class Generation(_Record):
    index: int
    old_languages: list[str] = Field(default_factory=list)
    new_languages: list[str] = Field(default_factory=list)
    data: dict[str, DataSourceRecord] = Field(default_factory=dict)
    profile: ProfileRecord = Field(default_factory=ProfileRecord)
    allocation: AllocationRecord = Field(default_factory=AllocationRecord)
    expansion: ExpansionRecord = Field(default_factory=ExpansionRecord)
    prepare1: PrepareRecord = Field(default_factory=PrepareRecord)  # stage 1's data
    stage1: TrainRecord = Field(default_factory=TrainRecord)
    prepare2: PrepareRecord = Field(default_factory=PrepareRecord)  # stage 2's data
    stage2: TrainRecord = Field(default_factory=TrainRecord)
    eval: EvalRecord = Field(default_factory=EvalRecord)

    @property
    def languages(self) -> list[str]:
        return self.old_languages + self.new_languages

    def step(self, name: str) -> StepRecord:
        if name not in STEP_NAMES:
            raise KeyError(name)
        return getattr(self, name)


class BaseModelRecord(_Record):
    spec: str  # as the user gave it; a local path is stored relative to the work dir
    kind: str  # local | hub | gguf | demo
    path: str | None = None
    absolute_path: str | None = None  # a hint only, tried when the relative path does not resolve
    hub_id: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    sha256: dict[str, str] = Field(default_factory=dict)  # weight file -> sha256, verified whenever the base is loaded
    tensor_sha256: dict[str, dict[str, str]] = Field(default_factory=dict)  # safetensors file -> tensor -> short digest
    model_type: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_parameters: int | None = None


class Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__
    created_at: datetime = Field(default_factory=utc_now)
    updated_at: datetime = Field(default_factory=utc_now)
    base_model: BaseModelRecord | None = None
    generations: list[Generation] = Field(default_factory=list)

    @property
    def current(self) -> Generation:
        """The newest expansion generation (G1 or later)."""
        if len(self.generations) < 2:
            raise LayermoeError("the manifest has no expansion generation yet: run `layermoe profile` first")
        return self.generations[-1]

    def dependents(self, generation_index: int, step: str) -> list[tuple[int, str]]:
        """Every (generation, step) built on `step` of `generation_index`, directly or not, in running order."""
        stale = {step}
        for name in STEP_NAMES:  # running order: a step's inputs are settled before it
            if any(i in stale for i in STEP_INPUTS[name]):
                stale.add(name)
        found = [(generation_index, name) for name in STEP_NAMES if name in stale and name != step]
        if stale & set(MODEL_STEPS):  # a new model of this generation: every later generation is built on it
            found += [(g.index, name) for g in self.generations if g.index > generation_index for name in STEP_NAMES]
        return found

    def invalidate_dependents(self, generation_index: int, step: str) -> list[tuple[int, str]]:
        """Mark every step built on this one pending (their outputs stay); return those that were not."""
        changed = []
        for index, name in self.dependents(generation_index, step):
            record = self.generations[index].step(name)
            if record.status != StepStatus.pending:
                record.status = StepStatus.pending
                changed.append((index, name))
        return changed

    def locate(self, record: "StepRecord") -> tuple[int, str] | None:
        """(generation index, step name) of a step record of this manifest, or None."""
        for generation in self.generations:
            for name in STEP_NAMES:
                if generation.step(name) is record:
                    return generation.index, name
        return None

    def generation_of_language(self) -> dict[str, int]:
        return {lang: g.index for g in self.generations for lang in g.new_languages}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# --- schema migrations -------------------------------------------------------------
# Each entry upgrades a manifest dict from version v to v + 1. Old work dirs keep working.


def _v1_to_v2(data: dict) -> dict:
    """v1 called the allocation budget `delta` and had no per-step pid/host."""
    for generation in data.get("generations", []):
        allocation = generation.get("allocation") or {}
        if "delta" in allocation:
            allocation["budget"] = allocation.pop("delta")
    return data


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def migrate(data: dict) -> dict:
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise LayermoeError("manifest.json has no integer schema_version: it is not a layermoe manifest")
    if version > SCHEMA_VERSION:
        raise LayermoeError(
            f"manifest.json has schema version {version}, newer than this layermoe ({__version__}) "
            f"understands (up to {SCHEMA_VERSION}): upgrade layermoe (pip install -U layermoe)"
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["schema_version"] = version
    return data


def parse_manifest(text: str, source: str = "manifest.json") -> Manifest:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayermoeError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}): restore it or start a new work dir")
    if not isinstance(data, dict):
        raise LayermoeError(f"{source} is not a JSON object: it is not a layermoe manifest")
    data = migrate(data)
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise LayermoeError(f"{source} does not match the manifest schema at `{where}`: {first['msg']}")
