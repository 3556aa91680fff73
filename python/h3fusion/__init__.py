"""h3fusion: fuse aligned LLMs into a mixture of experts (H3Fusion) and train with reward-weighted preference
fusion (FuseSFT / FusePO), on the h3fusion_ext kernels.

Importing `h3fusion` is cheap: the public names below load their modules (and torch, transformers and the compiled
extension) on first use (PEP 562). "h3fusion" still joins transformers' experts interface as soon as transformers
loads it, so `from_pretrained(..., experts_implementation="h3fusion")` works right after `import h3fusion`.
Each feature module adds its public names to `_EXPORTS` (name -> module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._lazy_registration import register_lazily

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # data
    "InstructionCollator": "h3fusion.data.instructions",
    "InstructionDataset": "h3fusion.data.instructions",
    "InstructionExample": "h3fusion.data.instructions",
    "load_instructions": "h3fusion.data.instructions",
    "build_pairs": "h3fusion.data.preference",
    "load_records": "h3fusion.data.preference",
    "normalize_weights": "h3fusion.data.preference",
    "rloo_groups": "h3fusion.data.preference",
    "save_records": "h3fusion.data.preference",
    "sft_examples": "h3fusion.data.preference",
    # losses
    "drift_regularization": "h3fusion.losses.gating",
    "gating_loss": "h3fusion.losses.gating",
    "load_balancing_loss": "h3fusion.losses.gating",
    "rloo_loss": "h3fusion.losses.preference",
    "simpo_loss": "h3fusion.losses.preference",
    "weighted_dpo_loss": "h3fusion.losses.preference",
    "weighted_sft_loss": "h3fusion.losses.preference",
    "wrpo_alpha": "h3fusion.losses.preference",
    "wrpo_loss": "h3fusion.losses.preference",
    # evaluation
    "evaluate": "h3fusion.evaluation",
    # models
    "H3FusionMoE": "h3fusion.models.moe_block",
    "fuse_models": "h3fusion.models.fuse",
    "fuse_to_disk": "h3fusion.models.fuse_stream",
    "save_fused_model": "h3fusion.models.fuse",
    "load_fused_model": "h3fusion.models.shared_format",
    "LoRAExperts": "h3fusion.models.lora_experts",
    "current_experts_implementation": "h3fusion.models.hf_experts",
    "register_experts_implementation": "h3fusion.models.hf_experts",
    "replace_moe_blocks": "h3fusion.models.hf_experts",
    "restore_moe_blocks": "h3fusion.models.hf_experts",
    "set_experts_implementation": "h3fusion.models.hf_experts",
    # reports and trainers
    "route_report": "h3fusion.route_report",
    "FusePOTrainer": "h3fusion.trainers.fuse_po",
    "FuseSFTTrainer": "h3fusion.trainers.fuse_sft",
    "H3FusionTrainer": "h3fusion.trainers.h3fusion_trainer",
    "precompute_reference_logps": "h3fusion.trainers.reference_logps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'h3fusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .data.instructions import InstructionCollator, InstructionDataset, InstructionExample, load_instructions
    from .data.preference import (
        build_pairs,
        load_records,
        normalize_weights,
        rloo_groups,
        save_records,
        sft_examples,
    )
    from .evaluation import evaluate
    from .losses.gating import drift_regularization, gating_loss, load_balancing_loss
    from .losses.preference import rloo_loss, simpo_loss, weighted_dpo_loss, weighted_sft_loss, wrpo_alpha, wrpo_loss
    from .models.fuse import fuse_models, save_fused_model
    from .models.fuse_stream import fuse_to_disk
    from .models.hf_experts import (
        current_experts_implementation,
        register_experts_implementation,
        replace_moe_blocks,
        restore_moe_blocks,
        set_experts_implementation,
    )
    from .models.lora_experts import LoRAExperts
    from .models.moe_block import H3FusionMoE
    from .models.shared_format import load_fused_model
    from .route_report import route_report
    from .trainers.fuse_po import FusePOTrainer
    from .trainers.fuse_sft import FuseSFTTrainer
    from .trainers.h3fusion_trainer import H3FusionTrainer
    from .trainers.reference_logps import precompute_reference_logps

# "h3fusion" joins transformers' ExpertsInterface as soon as transformers loads it (cheap: no import here).
register_lazily()
