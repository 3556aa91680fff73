"""The expert FFN with per-expert LoRA: `torch.ops.h3fusion.moe_lora_ffn_forward/_backward`, their fake (meta)
kernels and autograd (design.md §10). The public entry is `h3fusion_ext.moe_ffn(..., lora=ExpertLoRA(...))`.

Expert e computes with W_e + s B_e A_e for both projections, without forming that sum: the base GEMM plus a rank-r
detour per expert (csrc/cpu/moe_lora_ffn.cpp, csrc/cuda/moe_lora_ffn.cu). A base with leading dimension 1 is shared
by every expert and is applied once per token.
"""

from __future__ import annotations

import numbers

import torch

from ._arguments import check_same_device
from ._autograd import check_no_forward_ad_or_func_grad, once_differentiable
from ._library import ops
from .reference.moe import ACTIVATIONS

__all__ = ["ACTIVATIONS", "moe_lora_ffn"]

# Differentiable inputs of moe_lora_ffn_forward, in schema order (positions 0, 1, 3..8): the backward's output_mask.
_GRAD_INPUTS = (0, 1, 3, 4, 5, 6, 7, 8)


def scaling_arg(value) -> float:
    """The LoRA scale as a Python float; a bool or a non-number raises a TypeError naming it (a non-finite value is
    refused by the op itself, which also runs under torch.compile, where the scale may be symbolic)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | torch.SymFloat):
        kind = type(value).__name__
        raise TypeError(f"h3fusion_ext.moe_ffn: lora.scaling must be a real number, got {value!r} ({kind})")
    return float(value)


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
    """y_t = sum_j w_tj FFN_e(x_t) with expert e = e_tj using W_e + scaling * B_e A_e for both projections.

    The same arguments as `h3fusion_ext.reference.moe_lora_ffn` (the oracle); differentiable once with respect to
    x, weights, both bases and the four factors; deterministic.

    Args:
        x: [T, H] float32/bfloat16/float16/float64.
        weights: [T, k] routing weights, float32 or x.dtype.
        experts: [T, k] int32 expert ids in [0, E).
        gate_up_proj: [E, 2F, H] or [1, 2F, H] (a base shared by every expert), x.dtype.
        down_proj: [E, H, F] or [1, H, F], x.dtype.
        gate_up_a: [E, r, H]; gate_up_b: [E, 2F, r]; down_a: [E, r, F]; down_b: [E, H, r] (x.dtype).
        scaling: s, a finite real number.
        activation: "silu", "gelu" or "gelu_tanh".

    Returns:
        y: [T, H], x.dtype.

    Raises:
        RuntimeError: a wrong rank/shape/dtype/device (the message names the argument), or (CPU) an expert id
            outside [0, E).
        TypeError: `scaling` not a real number. ValueError: `activation` not one of `ACTIVATIONS`.
        RuntimeError: `scaling` not finite.
    """
    s = scaling_arg(scaling)
    if activation not in ACTIVATIONS:
        raise ValueError(f"h3fusion_ext.moe_ffn: activation must be one of {ACTIVATIONS}, got {activation!r}")
    tensors = (x, weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b)
    check_no_forward_ad_or_func_grad("moe_lora_ffn", *tensors)
    # Without autograd the op keeps no [T*k, 2F] pre-activation nor the rank-r projections.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return ops.moe_lora_ffn_forward(
        x, weights, experts, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b, s, activation, save
    )[0]


# ---- fake (meta) kernels ----------------------------------------------------------------------------------------


@torch.library.register_fake("h3fusion::moe_lora_ffn_forward")
def _forward_fake(
    x,
    weights,
    experts,
    gate_up_proj,
    down_proj,
    gate_up_a,
    gate_up_b,
    down_a,
    down_b,
    scaling,
    activation="silu",
    save_for_backward=True,
):
    check_same_device(
        "moe_ffn",
        "x",
        x,
        weights=weights,
        experts=experts,
        gate_up_proj=gate_up_proj,
        down_proj=down_proj,
        gate_up_a=gate_up_a,
        gate_up_b=gate_up_b,
        down_a=down_a,
        down_b=down_b,
    )
    P = experts.shape[0] * experts.shape[1]
    E, r = gate_up_a.shape[0], gate_up_a.shape[1]
    saved = P if save_for_backward else 0
    return (
        torch.empty_like(x),
        experts.new_empty((P,), dtype=torch.int32),
        experts.new_empty((P,), dtype=torch.int32),
        experts.new_empty((E + 1,), dtype=torch.int64),
        x.new_empty((saved, gate_up_proj.shape[1])),
        x.new_empty((saved, r)),
        x.new_empty((saved, r)),
    )


@torch.library.register_fake("h3fusion::moe_lora_ffn_backward")
def _backward_fake(
    grad_y,
    x,
    weights,
    gate_up_proj,
    down_proj,
    gate_up_a,
    gate_up_b,
    down_a,
    down_b,
    scaling,
    activation,
    sorted_pairs,
    pair_rows,
    offsets,
    gate_up_out,
    gate_up_z,
    down_z,
    output_mask=(True,) * 8,
):
    like = (x, weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b)
    check_same_device(
        "moe_lora_ffn_backward",
        "x",
        x,
        grad_y=grad_y,
        weights=weights,
        gate_up_proj=gate_up_proj,
        down_proj=down_proj,
        gate_up_a=gate_up_a,
        gate_up_b=gate_up_b,
        down_a=down_a,
        down_b=down_b,
        sorted_pairs=sorted_pairs,
        pair_rows=pair_rows,
        expert_offsets=offsets,
        gate_up_out=gate_up_out,
        gate_up_z=gate_up_z,
        down_z=down_z,
    )
    # A gradient left out by output_mask is an undefined tensor (None), as in the real kernels.
    return tuple(torch.empty_like(t) if need else None for t, need in zip(like, output_mask, strict=True))


# ---- autograd ---------------------------------------------------------------------------------------------------


def _setup(ctx, inputs, output):
    x, weights, _experts, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b, scaling, activation = inputs[
        :11
    ]
    _y, sorted_pairs, pair_rows, offsets, gate_up_out, gate_up_z, down_z = output
    ctx.mark_non_differentiable(sorted_pairs, pair_rows, offsets, gate_up_out, gate_up_z, down_z)
    ctx.save_for_backward(
        x,
        weights,
        gate_up_proj,
        down_proj,
        gate_up_a,
        gate_up_b,
        down_a,
        down_b,
        sorted_pairs,
        pair_rows,
        offsets,
        gate_up_out,
        gate_up_z,
        down_z,
    )
    ctx.scaling = scaling
    ctx.activation = activation


@once_differentiable("moe_lora_ffn")
def _backward(ctx, grad_y, *_unused):
    need = ctx.needs_input_grad
    # The kernel computes only the gradients asked for (a frozen base costs no weight-gradient GEMMs, routing
    # weights without grad no per-pair dot products) and returns None for the rest.
    mask = [bool(need[i]) for i in _GRAD_INPUTS]
    if grad_y is None or not any(mask):
        return (None,) * len(need)
    saved = ctx.saved_tensors
    grads = ops.moe_lora_ffn_backward(grad_y, *saved[:8], ctx.scaling, ctx.activation, *saved[8:], mask)
    result = [None] * len(need)
    for i, g in zip(_GRAD_INPUTS, grads, strict=True):
        result[i] = g
    return tuple(result)


torch.library.register_autograd("h3fusion::moe_lora_ffn_forward", _backward, setup_context=_setup)
