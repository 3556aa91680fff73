"""The drift regularizer on sharded parameters (FSDP2 `fully_shard`: DTensor parameters), design.md §9.

Under FSDP2 each expert weight `[E, ...]` is a DTensor sharded along dim 0 (experts, possibly unevenly) outside
forward. θ⁽⁰⁾ is held in the same sharding (each rank keeps only the rows of its shard), each rank computes the
partial sums Σ ΔW² of the experts rows it holds, and the [E] vector of per-expert sums is assembled across ranks by
DTensor's differentiable all-gather (`full_tensor`), whose backward hands each rank the gradient of its own rows. So
every rank computes the same regularizer as a single process, and its gradient lands on the local shard only, next
to FSDP2's reduce-scattered (rank-mean) LM gradient: the same convention as DDP.
Plain tensors pass through unchanged, so the single-process and DDP paths are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter or a reference held in its sharding)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def reference_like(ref: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """θ⁽⁰⁾ in the layout of `param`: a DTensor with the same mesh and placements (local rows only, no
    communication: every rank holds the same full snapshot) when `param` is sharded, else `ref` on param's device.

    Args:
        ref: the full (plain) or already-sharded reference weight, shape = the parameter's global shape.
        param: the model's parameter (plain tensor or DTensor).
    """
    if not is_sharded(param):
        return ref.to(param.device)
    if is_sharded(ref):
        return ref
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        ref.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
    )


def per_expert_squared_norm(delta: torch.Tensor) -> torch.Tensor:
    """Σ over all but dim 0 of delta² in fp32: [E, ...] -> [E], plain tensor; for a DTensor the per-shard partial
    sums are gathered across ranks (differentiable)."""
    sq = delta.float().pow(2).flatten(1).sum(dim=1)
    return sq.full_tensor() if is_sharded(sq) else sq


def shard_reference_state(model: torch.nn.Module, reference_state: dict[str, torch.Tensor], key_of) -> None:
    """Re-hold every θ⁽⁰⁾ entry in its parameter's layout, in place (frees the full copies of sharded weights).

    Args:
        model: the (possibly FSDP2-wrapped) model.
        reference_state: canonical parameter name -> θ⁽⁰⁾ tensor; updated in place.
        key_of: maps a parameter name of `model` to its canonical key (`canonical_param_name`).
    """
    for name, p in model.named_parameters():
        key = key_of(name)
        if key in reference_state:
            reference_state[key] = reference_like(reference_state[key], p)


def full_reference_state(reference_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain CPU copies of θ⁽⁰⁾ for saving; gathers sharded entries, so EVERY rank must call it together."""
    return {
        k: (v.full_tensor() if is_sharded(v) else v).detach().cpu().contiguous() for k, v in reference_state.items()
    }
