"""MoE ops: route plan, gather, combine and the fused expert FFN, with fake (meta) kernels and autograd.

The kernels are `torch.ops.h3fusion.*` (csrc/cpu/moe_*.cpp, csrc/cuda/). Conventions: a "pair" p = t*k + j is
slot j of token t; a "row" r is a position in the expert-sorted order given by `moe_route_plan`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._arguments import check_same_device, int_arg
from ._autograd import check_no_forward_ad_or_func_grad, once_differentiable
from ._dtypes import accumulate_dtype
from ._library import ops
from .reference.moe import ACTIVATIONS

__all__ = ["ExpertLoRA", "moe_combine", "moe_ffn", "moe_gather", "moe_route_plan"]


class ExpertLoRA(NamedTuple):
    """Per-expert LoRA factors for both expert projections: expert e uses W_e + scaling * B_e @ A_e.

    Fields (all in x.dtype, on x's device; r >= 1 is the rank, E the number of experts):
        gate_up_a: [E, r, H]; gate_up_b: [E, 2F, r] (the gate/up projection's A and B).
        down_a: [E, r, F]; down_b: [E, H, r] (the down projection's A and B).
        scaling: s, a Python float (PEFT's lora_alpha / r).
    """

    gate_up_a: torch.Tensor
    gate_up_b: torch.Tensor
    down_a: torch.Tensor
    down_b: torch.Tensor
    scaling: float


def moe_route_plan(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert, stably (pairs of one expert stay in ascending order).

    Expert ids outside ``[0, num_experts)`` raise on the CPU. On CUDA they cannot be checked without a host-device
    sync; such pairs are placed after every real expert, in rows ``[offsets[E], T*k)`` in ascending pair order, so
    ``sorted_pairs`` and ``pair_rows`` are still permutations and ``offsets[E]`` counts the valid pairs only.

    Args:
        experts: [T, k] int32 expert ids in [0, num_experts).
        num_experts: E >= 1, a Python integer (a float or bool raises a TypeError naming num_experts).

    Returns:
        sorted_pairs: [T*k] int32, row r -> pair p.
        pair_rows: [T*k] int32, the inverse permutation: pair p -> row r.
        expert_offsets: [E+1] int64, the rows of expert e are [offsets[e], offsets[e+1]).

    Raises:
        RuntimeError: `experts` not 2-D int32, num_experts < 1, or (CPU) an id outside [0, num_experts).
        TypeError: `num_experts` not an integer.
    """
    return ops.moe_route_plan(experts, int_arg(num_experts, "num_experts", "moe_route_plan"))


def moe_gather(x: torch.Tensor, sorted_pairs: torch.Tensor, k: int) -> torch.Tensor:
    """Copy token rows into expert-sorted order: x_sorted[r] = x[sorted_pairs[r] // k].

    Differentiable with respect to `x` (the backward sums each token's k rows, in slot order, through the inverse
    permutation). Contract: `sorted_pairs` is a permutation of [0, T*k), as `moe_route_plan` returns. On the CPU
    this is checked (O(T*k)); on CUDA it is the caller's contract, since checking would need a host-device sync:
    there an entry outside [0, T*k) gives a zero row, and a repeated entry gives a wrong gradient of `x`.

    Args:
        x: [T, H] float.
        sorted_pairs: [T*k] int32 permutation of [0, T*k), from `moe_route_plan`.
        k: experts per token, a Python integer >= 1.

    Returns:
        x_sorted: [T*k, H], x.dtype.

    Raises:
        RuntimeError: bad shapes/dtypes/devices, or (CPU) `sorted_pairs` not a permutation of [0, T*k).
        TypeError: `k` not an integer.
    """
    check_no_forward_ad_or_func_grad("moe_gather", x)
    return ops.moe_gather(x, sorted_pairs, int_arg(k, "k", "moe_gather"))


def moe_combine(rows: torch.Tensor, weights: torch.Tensor, pair_rows: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert-sorted rows: y[t] = sum_j w[t,j] rows[pair_rows[t*k+j]].

    Summed in slot order with fp32 accumulation (fp64 for fp64), no atomics. Differentiable with respect to `rows`
    and `weights`. Contract: `pair_rows` is a permutation of [0, T*k) (the backward reads through its inverse);
    checked on the CPU, the caller's contract on CUDA (no host-device sync), where an entry outside [0, T*k)
    contributes nothing.

    Args:
        rows: [T*k, H] float, expert-sorted.
        weights: [T, k] float32 or rows.dtype.
        pair_rows: [T*k] int32 permutation of [0, T*k), from `moe_route_plan`.

    Returns:
        y: [T, H], rows.dtype.

    Raises:
        RuntimeError: bad shapes/dtypes/devices, or (CPU) `pair_rows` not a permutation of [0, T*k).
    """
    check_no_forward_ad_or_func_grad("moe_combine", rows, weights)
    return ops.moe_combine(rows, weights, pair_rows)


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    lora: ExpertLoRA | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """The routed expert FFN: y_t = sum_j w_tj W_down[e_tj] (act(W_gate[e_tj] x_t) * W_up[e_tj] x_t).

    Weight layout of transformers' `MixtralExperts`. Differentiable with respect to x, weights, gate_up_proj and
    down_proj (once: a second derivative raises); deterministic (bitwise the same run to run).

    With `lora`, expert e computes with W_e + s B_e A_e for both projections without forming that sum (the base
    GEMM plus a rank-r detour, grouped per expert), and is differentiable with respect to the LoRA factors too.
    Then the base may be shared: gate_up_proj [1, 2F, H] and down_proj [1, H, F] serve every expert.

    Expert ids outside [0, E): the CPU raises a RuntimeError naming `experts`. CUDA cannot check them without a
    host-device sync, so there such a (token, slot) pair contributes exactly zero to y and gets zero gradient
    (its grad_weights entry is 0, and it adds nothing to grad_x or the weight gradients), like
    `h3fusion_ext.reference.moe_ffn`, which skips it.

    Args:
        x: [T, H] float32/bfloat16/float16/float64.
        weights: [T, k] routing weights, float32 or x.dtype.
        experts: [T, k] int32 expert ids in [0, E).
        gate_up_proj: [E, 2F, H], x.dtype; rows 0..F-1 are the gate projection, F..2F-1 the up projection.
            With `lora`, [1, 2F, H] is a base shared by every expert.
        down_proj: [E, H, F], x.dtype ([1, H, F]: shared, with `lora`).
        lora: optional `ExpertLoRA` factors (E experts, rank r).
        activation: the gate's activation, "silu" (SwiGLU, Mixtral's), "gelu" (exact) or "gelu_tanh".

    Returns:
        y: [T, H], x.dtype.

    Raises:
        RuntimeError: a wrong rank/shape/dtype/device (the message names the argument), or (CPU) an expert id
            outside [0, E).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_ffn: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if lora is not None:
        if not isinstance(lora, ExpertLoRA):
            raise TypeError(f"h3fusion_ext.moe_ffn: lora must be an h3fusion_ext.ExpertLoRA, got {type(lora).__name__}")
        from .moe_lora import moe_lora_ffn  # its own module (design.md §10)

        return moe_lora_ffn(x, weights, experts, gate_up_proj, down_proj, *lora, activation)
    check_no_forward_ad_or_func_grad("moe_ffn", x, weights, gate_up_proj, down_proj)
    # Without autograd the op keeps no [T*k, 2F] pre-activation (it only exists for the backward).
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up_proj, down_proj))
    return ops.moe_ffn_forward(x, weights, experts, gate_up_proj, down_proj, save, activation)[0]


# ---- fake (meta) kernels: every shape here is static ----------------------------------------------------------


@torch.library.register_fake("h3fusion::moe_route_plan")
def _moe_route_plan_fake(experts, num_experts):
    P = experts.numel()
    return (
        experts.new_empty((P,), dtype=torch.int32),
        experts.new_empty((P,), dtype=torch.int32),
        experts.new_empty((num_experts + 1,), dtype=torch.int64),
    )


@torch.library.register_fake("h3fusion::moe_gather")
def _moe_gather_fake(x, sorted_pairs, k):
    check_same_device("moe_gather", "x", x, sorted_pairs=sorted_pairs)
    return x.new_empty((sorted_pairs.shape[0], x.shape[1]))


@torch.library.register_fake("h3fusion::moe_combine")
def _moe_combine_fake(rows, weights, pair_rows):
    check_same_device("moe_combine", "rows", rows, weights=weights, pair_rows=pair_rows)
    return rows.new_empty((weights.shape[0], rows.shape[1]))


@torch.library.register_fake("h3fusion::moe_ffn_forward")
def _moe_ffn_forward_fake(x, weights, experts, gate_up_proj, down_proj, save_pre_activation=True, activation="silu"):
    check_same_device(
        "moe_ffn", "x", x, weights=weights, experts=experts, gate_up_proj=gate_up_proj, down_proj=down_proj
    )
    P = experts.shape[0] * experts.shape[1]
    return (
        torch.empty_like(x),
        experts.new_empty((P,), dtype=torch.int32),
        experts.new_empty((P,), dtype=torch.int32),
        experts.new_empty((gate_up_proj.shape[0] + 1,), dtype=torch.int64),
        x.new_empty((P if save_pre_activation else 0, gate_up_proj.shape[1])),
    )


@torch.library.register_fake("h3fusion::moe_ffn_backward")
def _moe_ffn_backward_fake(
    grad_y,
    x,
    weights,
    gate_up_proj,
    down_proj,
    sorted_pairs,
    pair_rows,
    offsets,
    gate_up_out,
    output_mask=(True,) * 4,
    activation="silu",
):
    check_same_device(
        "moe_ffn_backward",
        "x",
        x,
        grad_y=grad_y,
        weights=weights,
        gate_up_proj=gate_up_proj,
        down_proj=down_proj,
        sorted_pairs=sorted_pairs,
        pair_rows=pair_rows,
        expert_offsets=offsets,
        gate_up_out=gate_up_out,
    )
    # A gradient left out by output_mask is an undefined tensor (None), as in the real kernels.
    like = (x, weights, gate_up_proj, down_proj)
    return tuple(torch.empty_like(t) if need else None for t, need in zip(like, output_mask, strict=True))


# ---- autograd -------------------------------------------------------------------------------------------------


def _moe_ffn_setup(ctx, inputs, output):
    x, weights, _experts, gate_up_proj, down_proj = inputs[:5]
    _y, sorted_pairs, pair_rows, offsets, gate_up_out = output
    ctx.mark_non_differentiable(sorted_pairs, pair_rows, offsets, gate_up_out)  # plan + saved activation only
    ctx.save_for_backward(x, weights, gate_up_proj, down_proj, sorted_pairs, pair_rows, offsets, gate_up_out)
    ctx.activation = inputs[6] if len(inputs) > 6 else "silu"


@once_differentiable("moe_ffn")
def _moe_ffn_backward(ctx, grad_y, *_unused):
    need = ctx.needs_input_grad
    # x, weights, gate_up_proj, down_proj: the kernel computes only these (frozen experts skip their GEMMs,
    # routing weights without grad skip the per-pair dot products) and returns None for the rest.
    mask = [need[0], need[1], need[3], need[4]]
    if grad_y is None or not any(mask):
        return (None,) * len(need)
    grad_x, grad_w, grad_gu, grad_down = ops.moe_ffn_backward(grad_y, *ctx.saved_tensors, mask, ctx.activation)
    return (grad_x, grad_w, None, grad_gu, grad_down) + (None,) * (len(need) - 5)


torch.library.register_autograd("h3fusion::moe_ffn_forward", _moe_ffn_backward, setup_context=_moe_ffn_setup)


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    # -1 where `perm` misses a value (only possible on CUDA, where the permutation contract is not checked): the
    # combine then skips that entry instead of reading an uninitialised index.
    inv = torch.full_like(perm, -1)
    inv[perm.long()] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def _moe_gather_setup(ctx, inputs, output):
    x, sorted_pairs, k = inputs
    ctx.save_for_backward(sorted_pairs)
    ctx.k = k
    ctx.num_tokens = x.shape[0]


@once_differentiable("moe_gather")
def _moe_gather_backward(ctx, grad_rows):
    # The adjoint of a gather is a unit-weight combine: each token sums its own k rows (no atomics).
    (sorted_pairs,) = ctx.saved_tensors
    ones = grad_rows.new_ones((ctx.num_tokens, ctx.k))
    return ops.moe_combine(grad_rows.contiguous(), ones, _inverse_permutation(sorted_pairs)), None, None


torch.library.register_autograd("h3fusion::moe_gather", _moe_gather_backward, setup_context=_moe_gather_setup)


def _moe_combine_setup(ctx, inputs, output):
    rows, weights, pair_rows = inputs
    ctx.save_for_backward(rows, weights, pair_rows)


@once_differentiable("moe_combine")
def _moe_combine_backward(ctx, grad_y):
    rows, weights, pair_rows = ctx.saved_tensors
    T, k = weights.shape
    acc = accumulate_dtype(rows.dtype)
    idx = pair_rows.long()
    grad_rows = grad_weights = None
    if ctx.needs_input_grad[0]:
        per_pair = (grad_y.to(acc).unsqueeze(1) * weights.to(acc).unsqueeze(-1)).reshape(T * k, -1).to(rows.dtype)
        # Row r holds pair sorted_pairs[r], the inverse of pair_rows: a gather, deterministic on every device.
        grad_rows = per_pair.index_select(0, _inverse_permutation(pair_rows).long())
    if ctx.needs_input_grad[1]:
        per_pair = rows.index_select(0, idx).reshape(T, k, -1).to(acc)
        grad_weights = (per_pair * grad_y.to(acc).unsqueeze(1)).sum(-1).to(weights.dtype)
    return grad_rows, grad_weights, None


torch.library.register_autograd("h3fusion::moe_combine", _moe_combine_backward, setup_context=_moe_combine_setup)
