"""What `layermoe compare` runs: the variants, their expert budgets and allocate options (no torch)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layermoe.allocation.strategies import validate_budget, validate_linear_range
from layermoe.core.errors import LayermoeError
from layermoe.core.options import first_error
from layermoe.pipeline.recipes import GenerationRecipe

TITLES = {"layermoe": "LayerMoE", "layermoe-vocab": "LayerMoE + vocabulary", "neuronmoe": "NeuronMoE",
          "moe-lpr": "MoE-LPR", "dense": "dense fine-tune"}
# What the comparison decides itself; a recipe that sets them would be silently overridden.
_ALLOCATE_KEYS_SET_HERE = ("budget", "new_experts", "strategy", "neuron_mapping", "min_experts", "max_experts")


class CompareSpec(BaseModel):
    """The `compare:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    baseline_new_experts_per_layer: int = Field(2, ge=1)  # MoE-LPR: 1 + 2 = 3 experts per layer
    layermoe_share: float = Field(0.4, gt=0, le=1)  # LayerMoE's new experts / the baseline's
    dense_learning_rate: float | None = Field(None, gt=0)  # None: stage 1's (steps and tokens stay stage 1's)
    budgets: list[int] | None = None  # LayerMoE at each δ instead of the share's (`--budgets 36,54,72`)
    neuron_mapping: Literal["proportional", "linear"] = "proportional"  # NeuronMoE: at LayerMoE's δ, or the authors'
    neuron_min_experts: int = Field(1, ge=1)  # linear mapping only
    neuron_max_experts: int = Field(6, ge=1)
    # "LayerMoE + vocabulary": LayerMoE at the same δ and steps, with this many new tokens (`expand --new-tokens`)
    vocabulary_new_tokens: int | None = Field(None, ge=1)
    vocabulary_attach_marks: bool = False
    # Which variants to run, by folder name (None: all of them); e.g. [layermoe, layermoe-vocab]
    variants: list[str] | None = None


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def expert_budgets(num_layers: int, spec: CompareSpec) -> dict[str, int]:
    """New experts of each variant and LayerMoE's δ (which counts every layer's expert 0)."""
    baseline = num_layers * spec.baseline_new_experts_per_layer
    layermoe = round_half_up(spec.layermoe_share * baseline)
    if layermoe < 1:
        raise LayermoeError(f"layermoe_share {spec.layermoe_share} of {baseline} baseline experts rounds to 0 new experts: "
                            "raise compare.layermoe_share")
    delta = num_layers + layermoe
    assert delta >= num_layers  # Eq. 10 needs δ >= layers (expert 0 everywhere)
    return {"baseline_new_experts": baseline, "layermoe_new_experts": layermoe, "layermoe_budget": delta}


def plan_variants(num_layers: int, spec: CompareSpec, allocate: dict) -> list[dict]:
    """The MoE variants, in table order: name (its folder), title, the allocate options of its run
    (`allocate`: the recipe's own allocate settings, kept under every variant's) and, for the
    vocabulary variant, the expand options it adds."""
    budgets = expert_budgets(num_layers, spec)
    share = budgets["layermoe_budget"]
    layermoe_budgets = sorted(set(spec.budgets)) if spec.budgets else [share]
    for delta in layermoe_budgets:
        validate_budget(num_layers, delta)
    if spec.neuron_mapping == "linear":
        validate_linear_range(spec.neuron_min_experts, spec.neuron_max_experts)
    variants = []
    for delta in layermoe_budgets:
        variants.append({"name": "layermoe" if delta == share else f"layermoe-{delta}",
                         "title": "LayerMoE" if not spec.budgets else f"LayerMoE δ={delta}",
                         "allocate": {**allocate, "strategy": "layerwise", "budget": delta}})
    if spec.vocabulary_new_tokens:
        variants.append({"name": "layermoe-vocab", "title": TITLES["layermoe-vocab"],
                         "allocate": {**allocate, "strategy": "layerwise", "budget": share},
                         "expand": {"new_tokens": spec.vocabulary_new_tokens,
                                    "attach_marks": spec.vocabulary_attach_marks}})
    neuron = {**allocate, "strategy": "neuron", "neuron_mapping": spec.neuron_mapping}
    if spec.neuron_mapping == "linear":
        neuron.update(min_experts=spec.neuron_min_experts, max_experts=spec.neuron_max_experts)
    else:
        neuron["budget"] = share
    variants.append({"name": "neuronmoe", "title": TITLES["neuronmoe"], "allocate": neuron})
    # MoE-LPR routes with its LPR loss alone: no routing classifier
    variants.append({"name": "moe-lpr", "title": TITLES["moe-lpr"],
                     "allocate": {**allocate, "strategy": "uniform", "new_experts": budgets["baseline_new_experts"],
                                  "classifier_layers": 0}})
    return [v for v in variants if wanted(spec, v["name"])]


def wanted(spec: CompareSpec, name: str) -> bool:
    """Whether `compare.variants` asks for this variant (every LayerMoE δ counts as `layermoe`)."""
    if spec.variants is None:
        return True
    return name in spec.variants or (name.startswith("layermoe-") and name != "layermoe-vocab" and "layermoe" in spec.variants)


def check_variant_names(spec: CompareSpec) -> None:
    if spec.variants is None:
        return
    unknown = [name for name in spec.variants if name not in TITLES]
    if unknown:
        raise LayermoeError(f"recipe `compare.variants`: unknown variant {unknown[0]!r}; the variants are "
                            + ", ".join(TITLES))
    if not [name for name in spec.variants if name != "dense"]:
        raise LayermoeError("recipe `compare.variants` needs at least one MoE variant (the dense fine-tune reads its data)")
    if "layermoe-vocab" in spec.variants and not spec.vocabulary_new_tokens:
        raise LayermoeError("recipe `compare.variants` names layermoe-vocab: set compare.vocabulary_new_tokens too")




def check_compare_recipe(recipe) -> tuple[CompareSpec, GenerationRecipe]:
    """The `compare:` section and the one generation of a compare recipe, checked."""
    try:
        spec = CompareSpec.model_validate(recipe.compare or {})
    except ValidationError as e:
        where, message = first_error(e)
        raise LayermoeError(f"recipe `compare.{where}`: {message}") from None
    check_variant_names(spec)
    if len(recipe.generations) != 1:
        raise LayermoeError(f"a compare recipe has exactly one generation (G0 → G1), not {len(recipe.generations)}")
    generation = recipe.generations[0]
    fixed = [key for key in _ALLOCATE_KEYS_SET_HERE if key in generation.allocate.model_fields_set]
    if fixed:
        raise LayermoeError(f"a compare recipe sets `allocate.{fixed[0]}` itself: remove it and use "
                            "compare.baseline_new_experts_per_layer / compare.layermoe_share / compare.budgets / "
                            "compare.neuron_mapping")
    if generation.stage1 is None or generation.stage2 is None:
        raise LayermoeError("a compare recipe needs both `stage1` and `stage2` (the dense variant uses stage1's settings)")
    extra = sorted(generation.eval.model_fields_set - {"max_tokens"}) if generation.eval is not None else []
    if extra:
        raise LayermoeError(f"a compare recipe measures bits per byte only: `eval.{extra[0]}` is not supported here (keep max_tokens)")
    return spec, generation
