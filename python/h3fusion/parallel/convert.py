"""Convert MoE layers to expert parallelism in place, keeping only this rank's experts (design.md §9)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..models.hf_experts import experts_activation
from ..models.lora_experts import LoRAExperts
from ..models.moe_block import H3FusionMoE
from .expert_parallel import ExpertParallelExperts, HFExpertParallelExperts


def _is_hf_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return (
        isinstance(getattr(module, "gate", None), nn.Module)
        and isinstance(experts, nn.Module)
        and hasattr(experts, "gate_up_proj")
        and hasattr(experts, "down_proj")
    )


def convert_to_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, grad_divisor: int = 1) -> int:
    """Shard the experts of every MoE layer of `model` over `group`, in place.

    Handles `H3FusionMoE` layers and transformers MoE blocks (`.gate` router + `.experts` with
    `gate_up_proj[E, 2F, H]`, `down_proj[E, H, F]`: Mixtral, so every fused H3Fusion model, and Qwen-MoE/OLMoE).
    Each experts module is replaced by an `ExpertParallelExperts` that keeps only this rank's contiguous block of
    experts (copies of those slices; the full tensors are released). Routers and everything else stay replicated.
    Every rank of `group` must convert the same model (same weights) and then run the same number of forwards.

    Args:
        model: the model (or a single layer) to convert.
        group: the expert-parallel process group (None: the default group).
        grad_divisor: the data-parallel world size when dense gradients are averaged by DDP (see
            `h3fusion.parallel.groups`); 1 when the loss is the sum over ranks.

    Returns:
        The number of MoE layers converted (0 for a dense model).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: a layer has fewer experts than the group has ranks, or LoRA experts (nothing is changed).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("convert_to_expert_parallel: torch.distributed is not initialised (init_process_group)")
    world = dist.get_world_size(group)
    layers = [m for m in model.modules() if isinstance(m, H3FusionMoE) or _is_hf_block(m)]
    layers = [m for m in layers if not isinstance(m.experts, ExpertParallelExperts)]
    activations = []
    for layer in layers:  # validate first, so a refusal leaves the model untouched
        if isinstance(layer.experts, LoRAExperts):  # sharding only the base would drop the adapters
            raise ValueError(
                f"{type(layer).__name__}: LoRA experts (LoRAExperts) cannot be made expert-parallel yet; fold them "
                "in first (h3fusion.models.merge_lora_experts, or `h3fusion export` for a shared-base model)"
            )
        e = layer.experts.gate_up_proj.shape[0]
        if e < world:
            raise ValueError(f"{type(layer).__name__}: {e} experts cannot be split over {world} ranks")
        if isinstance(layer, H3FusionMoE):
            activations.append(layer.experts.activation)
        else:
            activation = experts_activation(layer.experts)
            if activation is None:
                raise ValueError(f"{type(layer.experts).__name__}: its activation is not one moe_ffn supports")
            activations.append(activation)
    for layer, activation in zip(layers, activations, strict=True):
        cls = ExpertParallelExperts if isinstance(layer, H3FusionMoE) else HFExpertParallelExperts
        old = layer.experts
        layer.experts = cls(
            old.gate_up_proj, old.down_proj, group=group, grad_divisor=grad_divisor, activation=activation
        )
        del old
    return len(layers)
