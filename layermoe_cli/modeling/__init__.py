"""The expanded (layer-wise MoE) model: config, modeling, and the upcycling helpers."""

from layermoe_cli.modeling.configuration_layermoe import LayermoeConfig
from layermoe_cli.modeling.modeling_layermoe import (
    LayermoeCausalLMOutput,
    LayermoeExpertGroup,
    LayermoeForCausalLM,
    LayermoeMoeBlock,
    parameter_groups,
    register_auto_classes,
    route_top_k,
)
from layermoe_cli.modeling.upcycle import ROUTER_INITS, add_generation, load_layermoe, save_layermoe, upcycle

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
