"""Configuration of a layer-wise MoE model: a dense base config plus the expansion on top.

Self-contained on purpose (imports only transformers): this file is copied next to every
saved checkpoint so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
works without layermoe installed.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

# Base-config attributes copied to the top level so that generation utilities, trainers and
# evaluation harnesses that read `model.config.<x>` see the values of the base model.
_EXPOSED_BASE_ATTRIBUTES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
)

MOE_KERNELS = ("auto", "grouped", "loop")
# transformers' own `experts_implementation` values (a loading option of every model), mapped
# onto ours so that `from_pretrained(..., experts_implementation="eager")` does what it says.
TRANSFORMERS_EXPERTS_TO_MOE_KERNEL = {"eager": "loop", "grouped_mm": "grouped", "batched_mm": "grouped"}
CLASSIFIER_GRANULARITIES = ("token", "sequence")


class LayermoeConfig(PretrainedConfig):
    """A dense base model (`base_config`, the family's own `config.to_dict()`) expanded layer-wise.

    new_experts[i][g-1] = number of new experts layer i received in generation g (G1, G2, ...).
    Expert 0 (the base FFN) is implicit, so layer i has `1 + sum(new_experts[i])` experts and
    a layer whose counts are all zero keeps the base MLP untouched.
    """

    model_type = "layermoe"

    base_config: dict | None = None
    new_experts: list | None = None
    classifier_layers: list | None = None
    classifier_classes: int = 2
    classifier_granularity: str = "token"
    classifier_routing: bool = True
    # Router top-k. Not called `top_k`: transformers would read that as a sampling parameter.
    num_experts_per_tok: int = 2
    # How the new experts run: grouped GEMMs, a per-expert loop, or auto (grouped on CUDA).
    # Not called `experts_implementation`: that is transformers' own loading option.
    moe_kernel: str = "auto"
    # Embedding rows after each generation, G0 (the base) first, when generations added tokens
    # (`expand --new-tokens`): rows [vocab_sizes[g-1], vocab_sizes[g]) are generation g's tokens.
    vocab_sizes: list | None = None

    def __post_init__(self, **kwargs: Any):
        if "top_k" in kwargs:
            raise ValueError("LayermoeConfig has no top_k (a sampling parameter in transformers); use num_experts_per_tok")
        # Checkpoints written before the rename store our kernel choice as `experts_implementation`.
        if kwargs.get("experts_implementation") in MOE_KERNELS:
            self.moe_kernel = kwargs.pop("experts_implementation")
        self.base_config = dict(self.base_config or {})
        self.new_experts = [[int(n) for n in row] for row in (self.new_experts or [])]
        self.classifier_layers = sorted(int(i) for i in (self.classifier_layers or []))
        # Top-level copies of base attributes are derived, never authoritative.
        for key in _EXPOSED_BASE_ATTRIBUTES:
            kwargs.pop(key, None)
        super().__post_init__(**kwargs)
        for key in _EXPOSED_BASE_ATTRIBUTES:
            if key in self.base_config:
                setattr(self, key, self.base_config[key])
        if self.base_config:
            self.validate_expansion()

    # ----- derived views -------------------------------------------------------------------
    @property
    def num_generations(self) -> int:
        """How many expansion steps (G1, G2, ...) this model has been through."""
        return max((len(row) for row in self.new_experts), default=0)

    @property
    def experts_per_layer(self) -> list[int]:
        """Total experts per decoder layer, expert 0 included."""
        return [1 + sum(row) for row in self.new_experts]

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers that are MoE blocks (more than one expert)."""
        return [i for i, n in enumerate(self.experts_per_layer) if n > 1]

    def expert_generation_ids(self, layer: int) -> list[int]:
        """Generation of each router column of `layer`: e.g. [0, 1, 1, 1, 2, 2]."""
        ids = [0]
        for generation, count in enumerate(self.new_experts[layer], start=1):
            ids += [generation] * count
        return ids

    def base_pretrained_config(self) -> PretrainedConfig:
        """The base family's own config object, rebuilt from `base_config`."""
        kwargs = dict(self.base_config)
        model_type = kwargs.pop("model_type")
        return AutoConfig.for_model(model_type, **kwargs)

    def validate_expansion(self) -> None:
        """Raise ValueError (one line) if the expansion does not fit the base model."""
        layers = self.base_config.get("num_hidden_layers")
        if len(self.new_experts) != layers:
            raise ValueError(
                f"new_experts has {len(self.new_experts)} rows but the base model has {layers} layers; give one row per layer"
            )
        if any(n < 0 for row in self.new_experts for n in row):
            raise ValueError("new_experts holds a negative count; expert counts must be >= 0")
        generations = self.num_generations
        self.new_experts = [row + [0] * (generations - len(row)) for row in self.new_experts]
        moe = set(self.moe_layers)
        bad = [i for i in self.classifier_layers if i not in moe]
        if bad:
            raise ValueError(f"classifier_layers {bad} have no new experts; a routing classifier needs a MoE layer")
        if self.classifier_layers and not 2 <= self.classifier_classes <= generations + 1:
            raise ValueError(
                f"classifier_classes={self.classifier_classes} must be 2 (old/new) or up to generations+1={generations + 1}"
            )
        if self.classifier_granularity not in CLASSIFIER_GRANULARITIES:
            raise ValueError(
                f"classifier_granularity={self.classifier_granularity!r}; use one of {', '.join(CLASSIFIER_GRANULARITIES)}"
            )
        if self.moe_kernel not in MOE_KERNELS:
            raise ValueError(f"moe_kernel={self.moe_kernel!r}; use one of {', '.join(MOE_KERNELS)}")
        if self.num_experts_per_tok < 1:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok}; it must be at least 1")


__all__ = ["LayermoeConfig"]
