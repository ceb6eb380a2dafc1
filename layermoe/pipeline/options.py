"""The options of every pipeline step, one pydantic model per step; each field written once.

`cli.py` builds each command's flags from these models, the recipe runner validates each step's
section of a recipe with them, and the step functions take them. Training's own knobs are
`training.config.TrainConfig` and the data selection `data.selection.DataSelection`; `prepare`
and `train` take those nested here. Torch-free (the CLI draws `--help` from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from layermoe.core.options import CommaList, FlagsFrom, NumberList, StepOptions, option
from layermoe.data.selection import DataSelection
from layermoe.profiling.settings import NEURON_DOCUMENTS, NEURON_TOP_N, PROFILE_BATCH_TOKENS, PROFILE_TOKENS
from layermoe.training.config import TrainConfig

DEVICE_HELP = "auto | cpu | cuda"
DTYPE_HELP = "The models' weights: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16."
DATA_HELP = "LANG=SPEC (.txt/.jsonl/.json/.parquet file or dir, hf:NAME[:CONFIG[:SPLIT]], builtin). Repeatable."


class ProfileOptions(StepOptions):
    """`layermoe profile`: layer similarity (Eq. 8-9) and language-specific neurons of the current model."""

    recipe_excluded: ClassVar[frozenset[str]] = frozenset({"model", "old", "new", "data", "device"})

    model: str | None = option(None, "--model", "-m", help="Base model: local dir, hub id, .gguf file, or `demo`. Needed for a new work dir.")
    old: CommaList = option([], "--old", help="Comma-separated languages the base model already handles (G0).")
    new: CommaList = option([], "--new", help="Comma-separated languages to add in this generation.")
    data: list[str] = option([], "--data", "-d", typer={"metavar": "LANG=SPEC"}, help=DATA_HELP)
    text_field: str = option("text", help="Field holding the text in .jsonl/.json/.parquet/hf data.")
    tokens: int = option(PROFILE_TOKENS, help="Tokens sampled per language (paper: 100,000).")
    batch_tokens: int = option(PROFILE_BATCH_TOKENS, help="Tokens per forward batch.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help="auto | float32 | bfloat16")
    seed: int = option(0, help="Seed of the token sample.")
    include_bos: bool = option(False, "--include-bos", help="Keep the beginning-of-sequence token.")
    document_order: str = option("shuffled", help="shuffled (seeded, the default) | file: the first documents in the source's order (the authors')")
    long_documents: str = option("split", help="split: a long document gives several sequences (the default) | truncate: cut at --max-document-tokens (the authors')")
    max_document_tokens: int | None = option(None, help="Tokens of one profiled sequence at most (default 1,024 or the model's limit; the authors: 10,000).")
    neuron_top_n: int = option(NEURON_TOP_N, "--neuron-top-n", help="Language-specific neurons kept per language (NeuronMoE; 0 = no neuron count).")
    neuron_documents: int = option(NEURON_DOCUMENTS, "--neuron-docs", help="Documents per language whose pooled FFN responses rank the neurons.")
    force: bool = option(False, "--force", help="Redo the step even if it is done.")


class AllocateOptions(StepOptions):
    """`layermoe allocate`: how many experts each layer gets (Eq. 10, or a baseline)."""

    budget: int | None = option(None, "--budget", help="δ: total experts over all layers, counting each layer's expert 0.")
    new_experts: int | None = option(None, "--new-experts", help="New experts in all; same as --budget N + layers.")
    strategy: str = option("layerwise", help="layerwise (Eq. 10) | neuron (NeuronMoE: language-specific neurons) | uniform (MoE-LPR) | random (ablation)")
    classifier_layers: int | None = option(None, "--classifier-layers", help="K layers of highest similarity get a routing classifier (default 30% of layers; 0 = none).")
    rounding: str = option("exact", help="exact (Σ N^i = δ) | ceil (the paper's literal formula)")
    max_per_layer: int | None = option(None, "--max-per-layer", help="Cap on experts in one layer.")
    neuron_mapping: str = option("proportional", "--neuron-mapping", help="neuron strategy: proportional (Σ N^i = δ) | linear (the authors' min-max formula, not budget-bound)")
    min_experts: int | None = option(None, "--min-experts", help="Linear neuron mapping: experts of the layer with fewest neurons (default 1).")
    max_experts: int | None = option(None, "--max-experts", help="Linear neuron mapping: experts of the layer with most neurons (default 6).")
    experts_per_layer: NumberList = option(None, "--experts-per-layer", help="Totals per layer, expert 0 included (e.g. 5,4,3,...), or a file of them: the manual strategy (the authors' published lists).")
    total_experts_per_layer: NumberList = option(None, "--total-experts-per-layer", help="G2 and later, manual: each layer's total after this generation, earlier generations' experts included (the authors' G2 lists).")
    classifier_at: NumberList = option(None, "--classifier-at", help="Routing classifiers on exactly these layers (0-based, e.g. 5,6,10,11), or `none`.")
    seed: int = option(0, help="Seed of the random strategy.")
    force: bool = option(False, "--force")


class ExpandOptions(StepOptions):
    """`layermoe expand`: upcycle (G1) or extend (G2+) the model and save a Hugging Face checkpoint."""

    recipe_excluded: ClassVar[frozenset[str]] = frozenset({"device"})

    budget: int | None = option(None, "--budget", help="Run `allocate --budget` first when there is no allocation yet.")
    top_k: int | None = option(None, "--top-k", help="Experts per token (default 2; set when G1 is expanded, kept by later generations).")
    classifier_granularity: str | None = option(None, help="token (the paper, default) | sequence (a causal running mean over the document; G1 only)")
    # G2 and later (set through `extend`; an expansion run again keeps what it used)
    classifier: str | None = option(None, help="generation (lifelong prior) | binary (the paper's old-vs-new)")
    expert_init: str | None = option(None, "--expert-init", help="New experts start as copies of: expert0 | routed (per layer, the expert the new languages' tokens are routed to most)")
    new_tokens: int | None = option(None, "--new-tokens", help="Learn up to N new tokens from the new languages' training text, leaving every old-language token as it is (README, \"New vocabulary\").")
    attach_marks: bool = option(False, "--attach-marks", help="With --new-tokens: keep combining marks with their letter when pre-tokenizing (Indic scripts on GPT-2-style tokenizers); refused if it would change old text.")
    vocab_text_mb: int = option(32, "--vocab-text-mb", help="With --new-tokens: MB of training text read per new language to learn them.")
    vocab_old_documents: int = option(10_000, "--vocab-old-documents", help="With --new-tokens: training documents per old language whose tokens are checked unchanged (besides all held-out ones).")
    router_init: str | None = option(None, help="How the new experts' router rows start: expert0 | source | mean | zeros | normal | reinit (every row afresh, the authors' G2) (default: expert0; source with --expert-init routed)")
    device: str = option("auto", help=DEVICE_HELP)
    force: bool = option(False, "--force")


class PrepareOptions(StepOptions):
    """`layermoe prepare --stage 1|2`: a stage's training data, read, split, tokenised and packed once."""

    stage: int = option(..., "--stage", help="1: the new languages; 2: those plus a replay of the old ones.", typer={"min": 1, "max": 2})
    recipe: Path | None = option(None, "--recipe", help="YAML with training options; its data settings are used (flags override them).")
    # The data selection's settings given as flags; they override the recipe's (the rest: defaults).
    data: Annotated[dict[str, Any], FlagsFrom(DataSelection)] = Field(default_factory=dict)
    num_proc: int | None = option(None, "--num-proc", help="Tokenising processes (default: every usable core).")
    force: bool = option(False, "--force", help="Prepare again even if prepared for these settings.")


# The TrainConfig fields `train` takes as flags (a recipe sets any field).
TRAIN_FLAGS = ("max_steps", "token_budget", "data.tokens_per_language", "learning_rate", "seq_len", "micro_batch_size",
               "grad_accum_steps", "global_batch_sequences", "precision", "checkpoint_every", "log_every", "seed", "report_to",
               "process_group_timeout_minutes")


class TrainOptions(StepOptions):
    """`layermoe train --stage 1|2`: the two training stages of the current generation."""

    stage: int = option(..., "--stage", help="1: new experts learn the new languages; 2: routers learn to protect old ones.")
    recipe: Path | None = option(None, "--recipe", help="YAML with training options (flags override it).")
    # The training settings given as flags (`TRAIN_FLAGS`); they override the recipe's (the rest: defaults).
    settings: Annotated[dict[str, Any], FlagsFrom(TrainConfig, only=TRAIN_FLAGS)] = Field(default_factory=dict)
    num_proc: int | None = option(None, "--num-proc", help="Tokenising processes if the data must be prepared (default: every usable core).")
    force: bool = option(False, "--force")


class EvalOptions(StepOptions):
    """`layermoe eval`: bits per byte, old vs new languages, routing health, lm-eval tasks."""

    recipe_excluded: ClassVar[frozenset[str]] = frozenset({"device"})

    langs: CommaList = option([], "--langs", help="Comma-separated languages (default: every language of every generation).")
    data: list[str] = option([], "--data", "-d", typer={"metavar": "LANG=SPEC"}, help="LANG=SPEC: your own test set, evaluated in full beside the held-out split (any SPEC profile takes; a language outside the lineage measures transfer). Repeatable.")
    text_field: str = option("text", help="Field holding the text in .jsonl/.json/.parquet/hf test sets.")
    model: str = option("current", "--model", help="base | current | PATH")
    max_tokens: int | None = option(None, "--max-tokens", help="Cap on held-out tokens per language.")
    tasks: CommaList = option([], "--tasks", help="lm-evaluation-harness tasks, comma-separated.")
    num_fewshot: int | None = option(None, "--num-fewshot")
    limit: int | None = option(None, "--limit")
    tasks_path: Path | None = option(None, "--tasks-path", help="Folder of extra lm-eval task YAMLs (e.g. local data).")
    batch_size: str = option("1", "--batch-size", help="lm-eval's batch size: N, auto (the largest that fits) or auto:N.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help=DTYPE_HELP)
    as_json: bool = option(False, "--json", help="Print the numbers as JSON only.")
    force: bool = option(False, "--force", help="Measure again even if this model was measured with these settings.")


class GenerateOptions(StepOptions):
    """`layermoe generate`: continue a prompt with a model of the lineage."""

    prompt: str = option(..., "--prompt", "-p", help="The text to continue.")
    model: str = option("current", "--model", help="base | current | gN (g0 = base) | PATH (a model folder or .gguf).")
    compare: str | None = option(None, "--compare", help="Show this model's continuation beside it, e.g. base.")
    max_new_tokens: int = option(64, "--max-new-tokens", help="Tokens to generate at most.")
    temperature: float = option(0.0, help="0 = greedy (the default); above 0 samples.")
    top_p: float = option(1.0, "--top-p", help="Nucleus sampling: keep the smallest token set with this much probability.")
    seed: int = option(0, help="Seed of the sampling.")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help=DTYPE_HELP)


# `extend`'s own command-line flags from the options of the steps it runs (the rest: their defaults).
EXTEND_FLAGS = {"profile": ("tokens",),
                "allocate": ("budget", "new_experts", "strategy", "neuron_mapping", "min_experts", "max_experts",
                             "classifier_layers"),
                "expand": ("classifier", "expert_init", "router_init", "new_tokens", "attach_marks", "vocab_text_mb",
                           "vocab_old_documents")}


class ExtendOptions(StepOptions):
    """`layermoe extend`: open the next generation (profile, allocate and expand again)."""

    new: CommaList = option(..., "--new", help="Comma-separated languages of the next generation.")
    data: list[str] = option([], "--data", "-d", typer={"metavar": "LANG=SPEC"}, help="LANG=SPEC, repeatable (earlier languages keep their data).")
    profile: Annotated[ProfileOptions, FlagsFrom(ProfileOptions, only=EXTEND_FLAGS["profile"])] = \
        Field(default_factory=ProfileOptions)
    allocate: Annotated[AllocateOptions, FlagsFrom(AllocateOptions, only=EXTEND_FLAGS["allocate"])] = \
        Field(default_factory=AllocateOptions)
    expand: Annotated[ExpandOptions, FlagsFrom(ExpandOptions, only=EXTEND_FLAGS["expand"])] = \
        Field(default_factory=ExpandOptions)
    drift_tokens: int | None = option(None, help="Held-out tokens per earlier language for the before/after check (default: the cap of the previous generation's eval, whose figures then serve as 'before'; else 20,000).")
    device: str = option("auto", help=DEVICE_HELP)


class StatusOptions(StepOptions):
    """`layermoe status`: the lineage."""

    as_json: bool = option(False, "--json", help="Print the manifest as JSON on stdout, nothing else.")


class EnvOptions(StepOptions):
    """`layermoe env`."""

    as_json: bool = option(False, "--json", help="Print the environment as JSON only.")


class RunOptions(StepOptions):
    """`layermoe run RECIPE`."""

    recipe: Path = option(..., help="A recipe YAML (a file, or the name of a shipped one: see `layermoe run --help`).",
                          typer={"argument": True})


class RecipesOptions(StepOptions):
    """`layermoe recipes [NAME]`."""

    name: str | None = option(None, help="A shipped recipe or accelerate config: print its path (for `accelerate launch --config_file`).",
                              typer={"argument": True})


class CompareOptions(StepOptions):
    """`layermoe compare [RECIPE]`."""

    recipe: Path | None = option(None, help="A recipe with a `compare:` section (default: the shipped `compare`, the demo).",
                                 typer={"argument": True})
    budgets: str | None = option(None, "--budgets", help="Comma-separated δ: run LayerMoE at each (e.g. 36,54,72).")


class DemoOptions(StepOptions):
    """`layermoe demo`."""

    compare: bool = option(False, "--compare", help="Instead of the chain: LayerMoE (40% of the baseline's new experts), NeuronMoE, MoE-LPR and a dense fine-tune, side by side (= `layermoe compare`).")
