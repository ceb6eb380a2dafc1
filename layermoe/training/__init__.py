"""Two-stage training of an expanded model (METHOD.md section 4)."""

from layermoe.data.packing import PackedData  # the data package owns packing; kept here for old imports
from layermoe.training.checkpoint import FrozenWeightsChanged, frozen_checksums, verify_frozen
from layermoe.training.config import TrainConfig, load_train_config
from layermoe.training.loop import TrainResult, freeze_for_stage, train_stage, trainable_groups
from layermoe.training.losses import (
    classifier_loss,
    classifier_over_layers,
    load_balancing_loss,
    load_balancing_over_layers,
    lpr_loss,
    lpr_over_layers,
)

__all__ = [
    "FrozenWeightsChanged",
    "PackedData",
    "TrainConfig",
    "TrainResult",
    "classifier_loss",
    "classifier_over_layers",
    "freeze_for_stage",
    "frozen_checksums",
    "load_balancing_loss",
    "load_balancing_over_layers",
    "load_train_config",
    "lpr_loss",
    "lpr_over_layers",
    "train_stage",
    "trainable_groups",
    "verify_frozen",
]
