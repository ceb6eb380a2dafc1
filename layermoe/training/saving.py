"""The end of a stage: the frozen weights verified, the trained model written.

The last collective call is the gather of a sharded model: the main process then verifies and
writes alone, and nobody waits for it inside a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from layermoe.modeling import LayermoeConfig, LayermoeForCausalLM, save_layermoe
from layermoe.training import checkpoint as ckpt
from layermoe.training.distributed import is_sharded
from layermoe.training.setup import StageModel, trainable_digest
from layermoe.vocabulary.files import save_clean_tokenizer


def checkpoint_tensors(model_dir: Path) -> Callable[[str], torch.Tensor]:
    """name -> tensor, read lazily from a checkpoint's safetensors files (the frozen originals)."""
    where = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({name: path for name in f.keys()})

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    return read


def model_from_state_dict(model_dir: Path, dense: bool, state: dict, dtype, frozen: set[str], reference):
    """The trained model for saving, built on the meta device around the gathered state dict.

    No second full copy: the tensors are assigned, not copied. Frozen tensors are taken from
    the source checkpoint (verified equal), so an engine that held them in bf16 (DeepSpeed)
    cannot round them in the saved model.
    """
    with torch.device("meta"):
        if dense:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        else:
            model = LayermoeForCausalLM(LayermoeConfig.from_pretrained(model_dir))
    tensors = {name: (reference(name) if name in frozen else value).to(dtype) for name, value in state.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"the gathered state dict lacks {', '.join(left[:3])}: this is a bug")
    return model


def verify_and_save(accelerator, model, stage: StageModel, model_dir: Path, output_dir: Path, tokenizer,
                    stage_number: int, gradient_checkpointing: bool) -> list[str]:
    """Check every frozen weight against its checksum, then write the model (main process only).

    Returns each process's digest of its trainable weights (empty when sharded: there is one copy).
    """
    main = accelerator.is_main_process
    if is_sharded(accelerator):
        full = accelerator.get_state_dict(model)  # the one gather, onto the main process
        checksum_by_rank: list[str] = []
        if main:
            reference = checkpoint_tensors(model_dir)
            views = dict(stage.frozen_views(full))
            ckpt.verify_frozen(views.items(), {k: stage.frozen_sums[k] for k in views}, reference=reference)
            final = model_from_state_dict(model_dir, stage.dense, full, stage.storage_dtype,
                                          frozen=set(stage.frozen_names), reference=reference)
    else:
        live = dict(accelerator.unwrap_model(model).named_parameters())
        ckpt.verify_frozen(stage.frozen_views(live), stage.frozen_sums)
        checksum_by_rank = gather_object([trainable_digest([(n, live[n]) for n in stage.trainable_names])])
        final = accelerator.unwrap_model(model)
        if main:
            final.to(stage.storage_dtype)
    if main:
        if gradient_checkpointing:
            final.gradient_checkpointing_disable()
        if stage.dense:
            final.save_pretrained(output_dir, safe_serialization=True)
            save_clean_tokenizer(tokenizer, output_dir)
        else:
            final.set_classifier_routing(stage_number == 2)
            save_layermoe(final, output_dir, tokenizer)
    return list(checksum_by_rank)
