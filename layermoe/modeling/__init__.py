"""The expanded (layer-wise MoE) model: config, modeling, upcycling, base models, generation.

Importing this package registers `model_type: layermoe` with AutoConfig / AutoModelForCausalLM.
"""

from layermoe.modeling.configuration_layermoe import LayermoeConfig
from layermoe.modeling.modeling_layermoe import (
    LayermoeCausalLMOutput,
    LayermoeExpertGroup,
    LayermoeForCausalLM,
    LayermoeMoeBlock,
    parameter_groups,
    register_auto_classes,
    route_top_k,
)
from layermoe.modeling.upcycle import ROUTER_INITS, add_generation, load_layermoe, save_layermoe, upcycle

__all__ = [
    "ROUTER_INITS",
    "LayermoeCausalLMOutput",
    "LayermoeConfig",
    "LayermoeExpertGroup",
    "LayermoeForCausalLM",
    "LayermoeMoeBlock",
    "add_generation",
    "load_layermoe",
    "parameter_groups",
    "register_auto_classes",
    "route_top_k",
    "save_layermoe",
    "upcycle",
]

register_auto_classes()
