"""Expert parallelism for one MoE layer: each rank of an expert-parallel group holds a contiguous block of experts.

The forward (design.md §9), per rank, for its own tokens x[T, H] routed to (weights, experts)[T, k]:
  1. the T·k (token, slot) pairs are sorted by global expert id (stable), which groups them by owning rank;
  2. the per-rank pair counts are exchanged (`all_to_all_single` of a [W] count vector);
  3. the pairs' token rows and their owner-local expert ids are exchanged (`all_to_all_single`, uneven splits);
  4. each rank runs `h3fusion_ext.moe_ffn` on the rows it received with its local experts (unit weight, k = 1);
  5. the outputs travel back by the reverse exchange, are put back in pair order and combined on the token's own
     rank: y_t = Σ_j w_tj · FFN_{e_tj}(x_t), so the routing weights never leave their rank.
No step loops over tokens in Python. The exchanges are differentiable (the backward is the reverse exchange), so the
gradients of x, of the routing weights and of the local experts' weights equal those of the single-process layer on
the concatenated batch. Deterministic: the order of every exchanged row is fixed by the stable sort.

Expert gradients: rank r's expert weights receive the gradient of the SUM over the group's ranks of their losses.
Data parallelism (DDP) averages the dense gradients over its ranks, so pass `grad_divisor` = the data-parallel world
size to put expert gradients on the same convention, and when several expert-parallel groups hold copies of the same
experts (EP inside DP), call `sync_expert_gradients` over the expert-data-parallel group after backward
(see `h3fusion.parallel.groups`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import h3fusion_ext

from .exchange import all_to_all_rows, exchange_counts


def expert_partition(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous blocks of experts per rank: [start, stop) for rank 0..W-1; the first E % W ranks get one more.

    Raises:
        ValueError: world_size < 1 or num_experts < world_size (every rank must own at least one expert).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_experts < world_size:
        raise ValueError(
            f"num_experts={num_experts} < expert-parallel group size {world_size}: every rank needs an expert"
        )
    base, extra = divmod(num_experts, world_size)
    sizes = [base + (r < extra) for r in range(world_size)]
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [(s, s + n) for s, n in zip(starts, sizes, strict=True)]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def expert_parallel_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """The MoE FFN of design.md §2 with the experts sharded over `group` (contiguous blocks, `expert_partition`).

    Args:
        x: [T, H] this rank's tokens (T may be 0, and may differ between ranks).
        weights: [T, k] routing weights (fp32 or x.dtype).
        experts: [T, k] GLOBAL expert ids in [0, num_experts), int32 or int64.
        gate_up_proj: [E_local, 2F, H] this rank's experts (global ids start .. stop-1 of `expert_partition`).
        down_proj: [E_local, H, F].
        num_experts: E, the experts of the whole layer.
        group: the expert-parallel process group (None: the default group).
        activation: the experts' gated activation ("silu", "gelu", "gelu_tanh"), as in `h3fusion_ext.moe_ffn`.

    Returns:
        y: [T, H] in x.dtype; differentiable w.r.t. x, weights, gate_up_proj and down_proj.

    Raises:
        ValueError: shapes that do not match, or local weights that are not this rank's block of experts.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start, stop = expert_partition(num_experts, world)[rank]
    if x.dim() != 2 or weights.shape != experts.shape or weights.dim() != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"x {tuple(x.shape)}, weights {tuple(weights.shape)}, experts {tuple(experts.shape)}: "
            "expected [T, H], [T, k], [T, k]"
        )
    if gate_up_proj.shape[0] != stop - start or down_proj.shape[0] != stop - start:
        raise ValueError(
            f"gate_up_proj/down_proj hold {gate_up_proj.shape[0]}/{down_proj.shape[0]} experts; rank {rank} of "
            f"{world} owns experts {start}..{stop - 1} of {num_experts}"
        )
    T, k = experts.shape
    H = x.shape[1]
    flat_experts = experts.reshape(-1).long()
    order = torch.sort(flat_experts, stable=True).indices  # [T*k], grouped by owning rank
    partition = expert_partition(num_experts, world)
    starts = torch.tensor([s for s, _ in partition], device=x.device)
    stops = torch.tensor([s for _, s in partition], device=x.device)
    owner = torch.bucketize(flat_experts, stops, right=True)  # [T*k] rank owning each pair's expert
    send_counts = torch.bincount(owner, minlength=world)
    if send_counts.numel() > world:
        raise ValueError(f"experts: ids must be in [0, num_experts={num_experts})")
    recv_counts = exchange_counts(send_counts, group)
    # all_to_all_single takes host split sizes: one small device->host copy per layer, unavoidable for the collective.
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    sorted_experts = flat_experts[order]
    local_ids = (sorted_experts - starts[owner[order]]).to(torch.int32)  # ids in the owner's block
    rows = x.index_select(0, order // k)  # [T*k, H] token rows in send order
    recv_rows = all_to_all_rows(rows, recv_splits, send_splits, group)
    recv_ids = all_to_all_rows(local_ids, recv_splits, send_splits, group)
    unit = torch.ones(recv_rows.shape[0], 1, dtype=torch.float32, device=x.device)
    out = h3fusion_ext.moe_ffn(recv_rows, unit, recv_ids.view(-1, 1), gate_up_proj, down_proj, activation=activation)
    back = all_to_all_rows(out, send_splits, recv_splits, group)  # [T*k, H] in send order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    per_pair = back.index_select(0, inverse).view(T, k, H)
    acc = h3fusion_ext.accumulate_dtype(x.dtype, weights.dtype)
    return (per_pair.to(acc) * weights.to(acc).unsqueeze(-1)).sum(1).to(x.dtype)


class ExpertParallelExperts(nn.Module):
    """This rank's block of one layer's experts, run through `expert_parallel_ffn`.

    Parameters `gate_up_proj[E_local, 2F, H]`, `down_proj[E_local, H, F]` (the names of transformers'
    MixtralExperts and of `H3FusionExperts`, so state-dict keys keep their names). Call signature of
    `H3FusionExperts`: (x[T, H], weights[T, k], experts[T, k] global ids) -> y[T, H].

    Args:
        gate_up_proj, down_proj: the FULL layer's expert weights [E, 2F, H], [E, H, F]; only this rank's block is
            kept (copied, so the full tensors can be freed).
        group: the expert-parallel process group (None: the default group).
        grad_divisor: the expert gradients are divided by this (the data-parallel world size under DDP).
        activation: the experts' gated activation ("silu", "gelu", "gelu_tanh").
    """

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        grad_divisor: int = 1,
        activation: str = "silu",
    ):
        super().__init__()
        self.activation = activation
        if grad_divisor < 1:
            raise ValueError(f"grad_divisor must be >= 1, got {grad_divisor}")
        self.num_experts = int(gate_up_proj.shape[0])
        self.group = group
        self.grad_divisor = grad_divisor
        self.expert_range = expert_partition(self.num_experts, dist.get_world_size(group))[dist.get_rank(group)]
        start, stop = self.expert_range
        self.gate_up_proj = nn.Parameter(gate_up_proj.detach()[start:stop].clone())
        self.down_proj = nn.Parameter(down_proj.detach()[start:stop].clone())

    # transformers' flag for expert-parallel experts: `replace_moe_blocks` / the "h3fusion" experts implementation
    # then refuse this module instead of running its local weights with global expert ids
    _is_expert_parallel = True

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' weights gathered from the group: (gate_up_proj[E, 2F, H], down_proj[E, H, F]), for saving a
        standard checkpoint. Every rank of the group must call it together."""
        world = dist.get_world_size(self.group)
        blocks = expert_partition(self.num_experts, world)
        most = max(stop - start for start, stop in blocks)
        out = []
        for local in (self.gate_up_proj, self.down_proj):
            padded = local.new_zeros((most, *local.shape[1:]))
            padded[: local.shape[0]] = local
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=self.group)
            out.append(torch.cat([p[: b - a] for p, (a, b) in zip(parts, blocks, strict=True)]))
        return out[0], out[1]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x[T, H], weights[T, k], experts[T, k] (global ids) -> y[T, H] in x.dtype."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.grad_divisor != 1:
            gate_up = _ScaleGrad.apply(gate_up, 1.0 / self.grad_divisor)
            down = _ScaleGrad.apply(down, 1.0 / self.grad_divisor)
        return expert_parallel_ffn(x, weights, experts, gate_up, down, self.num_experts, self.group, self.activation)

    def extra_repr(self) -> str:
        start, stop = self.expert_range
        return (
            f"experts {start}..{stop - 1} of {self.num_experts}, grad_divisor={self.grad_divisor}, "
            f"activation={self.activation}"
        )


class HFExpertParallelExperts(ExpertParallelExperts):
    """The same, with transformers' experts call signature: (hidden_states, top_k_index, top_k_weights)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):  # noqa: D102 (transformers' signature)
        return super().forward(hidden_states, top_k_weights, top_k_index)
