"""Process groups for expert parallelism inside data parallelism (design.md §9).

With D data-parallel ranks and expert-parallel groups of size P (P divides D):
  - expert-parallel (EP) groups: consecutive blocks of P ranks, {0..P-1}, {P..2P-1}, ...; the experts of every
    MoE layer are split over the P ranks of a block, and tokens are exchanged inside the block only;
  - expert-data-parallel groups: the ranks holding the same block of experts, {i, i+P, i+2P, ...}; their expert
    gradients are summed with `sync_expert_gradients` (a no-op when P = D).
Dense parameters (attention, norms, embeddings, routers) stay replicated on all D ranks and are averaged by DDP as
usual; tell DDP to ignore the expert parameters (`ignore_expert_parameters_in_ddp`), since they differ per rank.
Every rank sees its own data (a distributed sampler over all D ranks), exactly as under plain DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import ExpertParallelExperts


def build_expert_parallel_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Create the EP and expert-data-parallel groups; every rank of the default group must call this together.

    Args:
        ep_size: P, ranks per expert-parallel group; must divide the world size.

    Returns:
        (ep_group, expert_dp_group) that this rank belongs to.
    """
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the world size {world}")
    ep_group, _ = dist.new_subgroups_by_enumeration([list(range(b, b + ep_size)) for b in range(0, world, ep_size)])
    expert_dp_group, _ = dist.new_subgroups_by_enumeration([list(range(i, world, ep_size)) for i in range(ep_size)])
    return ep_group, expert_dp_group


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the expert-parallel parameters of `model` (for DDP's ignore list, optimizers...)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
    return names


def ignore_expert_parameters_in_ddp(model: nn.Module) -> None:
    """Make a later `DistributedDataParallel(model)` skip the expert-parallel parameters (call before wrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))


@torch.no_grad()
def sync_expert_gradients(model: nn.Module, expert_dp_group: dist.ProcessGroup | None) -> None:
    """Sum the expert gradients over the expert-data-parallel group (after backward, before the optimizer step).

    With `grad_divisor` = D on every `ExpertParallelExperts`, the result is the data-parallel mean, the same
    convention as DDP's dense gradients. A no-op when the group has one rank (EP over all ranks).
    """
    if expert_dp_group is None or dist.get_world_size(expert_dp_group) == 1:
        return
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            for p in module.parameters(recurse=False):
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=expert_dp_group)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert-parallel layer's experts gathered back to [E, ...]: what a
    single-process model would hold (save it from one rank with `save_pretrained(state_dict=...)`). Every rank of
    the expert-parallel groups must call it together."""
    state = dict(model.state_dict())
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            gate_up, down = module.full_weights()
            state[f"{prefix}.gate_up_proj" if prefix else "gate_up_proj"] = gate_up
            state[f"{prefix}.down_proj" if prefix else "down_proj"] = down
    return state
