"""Reference MoE permutation and expert FFN: the per-expert loop of transformers' eager Mixtral experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route_plan(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert, stably.

    Args:
        experts: [T, k] int32 expert ids in [0, num_experts).
        num_experts: E.

    Returns:
        sorted_pairs: [T*k] int32, row r -> pair p = t*k + j (pairs of one expert in ascending p).
        pair_rows: [T*k] int32, the inverse: pair p -> row r.
        expert_offsets: [E+1] int64, rows of expert e are [offsets[e], offsets[e+1]).
    """
    flat = experts.reshape(-1).to(torch.int64)
    sorted_pairs = torch.sort(flat, stable=True).indices
    pair_rows = torch.empty_like(sorted_pairs)
    pair_rows[sorted_pairs] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return sorted_pairs.to(torch.int32), pair_rows.to(torch.int32), offsets


def moe_gather(x: torch.Tensor, sorted_pairs: torch.Tensor, k: int) -> torch.Tensor:
    """x[T,H] -> x_sorted[T*k,H], x_sorted[r] = x[sorted_pairs[r] // k]."""
    return x.index_select(0, (sorted_pairs.to(torch.int64) // k))


def moe_combine(rows: torch.Tensor, weights: torch.Tensor, pair_rows: torch.Tensor) -> torch.Tensor:
    """rows[T*k,H] (expert-sorted), weights[T,k], pair_rows[T*k] -> y[T,H] = sum_j w[t,j] rows[pair_rows[t*k+j]]."""
    T, k = weights.shape
    per_pair = rows.index_select(0, pair_rows.to(torch.int64)).reshape(T, k, rows.shape[1])
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return (per_pair.to(acc) * weights.to(acc).unsqueeze(-1)).sum(dim=1).to(rows.dtype)


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """y_t = sum_j w_tj * W_down[e_tj] (silu(W_gate[e_tj] x_t) * W_up[e_tj] x_t), as a loop over experts.

    Args:
        x: [T, H] activations.
        weights: [T, k] routing weights (fp32 or x.dtype).
        experts: [T, k] int32 expert ids.
        gate_up_proj: [E, 2F, H]; rows 0..F-1 are the gate projection, F..2F-1 the up projection.
        down_proj: [E, H, F].

    Returns:
        y: [T, H] in x.dtype.
    """
    E = gate_up_proj.shape[0]
    y = torch.zeros_like(x)
    experts = experts.to(torch.int64)
    for e in range(E):
        token_idx, slot_idx = torch.where(experts == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(x[token_idx], gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, down_proj[e])
        out = out * weights[token_idx, slot_idx, None].to(out.dtype)
        y = y.index_add(0, token_idx, out.to(y.dtype))
    return y
