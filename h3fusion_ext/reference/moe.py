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


# Gated activations the expert FFN supports: act(gate) * up. "gelu" is the exact (erf) GELU, "gelu_tanh" the tanh
# approximation (transformers' "gelu_pytorch_tanh" / "gelu_new").
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up for activation in `ACTIVATIONS` (same shapes in and out)."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """y_t = sum_j w_tj * W_down[e_tj] (act(W_gate[e_tj] x_t) * W_up[e_tj] x_t), as a loop over experts.

    Args:
        x: [T, H] activations.
        weights: [T, k] routing weights (fp32 or x.dtype).
        experts: [T, k] int32 expert ids.
        gate_up_proj: [E, 2F, H]; rows 0..F-1 are the gate projection, F..2F-1 the up projection.
        down_proj: [E, H, F].
        activation: one of `ACTIVATIONS` ("silu": SwiGLU, Mixtral's default).

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
        out = F.linear(gated_activation(gate, up, activation), down_proj[e])
        out = out * weights[token_idx, slot_idx, None].to(out.dtype)
        y = y.index_add(0, token_idx, out.to(y.dtype))
    return y


def moe_lora_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_a: torch.Tensor,
    gate_up_b: torch.Tensor,
    down_a: torch.Tensor,
    down_b: torch.Tensor,
    scaling: float,
    activation: str = "silu",
) -> torch.Tensor:
    """The expert FFN with per-expert LoRA: expert e uses W_e + scaling * B_e A_e for both projections.

    The obvious way: form each expert's effective weights, then run `moe_ffn`'s loop. A base with leading
    dimension 1 is shared by every expert ("shared-base" experts: the same base FFN plus each expert's adapter).

    Args:
        x: [T, H].
        weights: [T, k] routing weights (fp32 or x.dtype).
        experts: [T, k] int32 expert ids in [0, E).
        gate_up_proj: [E, 2F, H] or [1, 2F, H] (shared base).
        down_proj: [E, H, F] or [1, H, F] (shared base).
        gate_up_a: [E, r, H]; gate_up_b: [E, 2F, r].
        down_a: [E, r, F]; down_b: [E, H, r].
        scaling: s, the LoRA scale (alpha / r).
        activation: one of `ACTIVATIONS`.

    Returns:
        y: [T, H] in x.dtype.
    """
    E = gate_up_a.shape[0]
    gate_up = gate_up_proj.expand(E, -1, -1) + scaling * torch.bmm(gate_up_b, gate_up_a)
    down = down_proj.expand(E, -1, -1) + scaling * torch.bmm(down_b, down_a)
    return moe_ffn(x, weights, experts, gate_up, down, activation)
