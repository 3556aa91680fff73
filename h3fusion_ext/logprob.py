"""linear_logprob: per-token log-probabilities of a linear head without materialising the [N, V] logits.

Wraps `torch.ops.h3fusion.linear_logprob_forward` / `linear_logprob_backward` (C++ on the CPU, CUDA on the GPU),
adds fake kernels (so `torch.compile` traces the op) and autograd.
"""

from __future__ import annotations

import torch

from ._arguments import check_same_device, int_arg
from ._autograd import check_no_forward_ad_or_func_grad, once_differentiable
from ._dtypes import accumulate_dtype
from ._library import ops

__all__ = ["linear_logprob"]


@torch.library.register_fake("h3fusion::linear_logprob_forward")
def _forward_fake(hidden, weight, targets, ignore_index):
    check_same_device("linear_logprob", "hidden", hidden, weight=weight, targets=targets)
    n = hidden.shape[0]
    acc = accumulate_dtype(hidden.dtype)
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc)


@torch.library.register_fake("h3fusion::linear_logprob_backward")
def _backward_fake(grad_logp, grad_lse, hidden, weight, targets, lse, ignore_index, output_mask=(True, True)):
    check_same_device(
        "linear_logprob_backward",
        "hidden",
        hidden,
        grad_logp=grad_logp,
        grad_lse=grad_lse,
        weight=weight,
        targets=targets,
        lse=lse,
    )
    # A gradient left out by output_mask is an undefined tensor (None), as in the real kernels.
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need else None
        for t, need in zip((hidden, weight), output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse)
    ctx.ignore_index = ignore_index


@once_differentiable("linear_logprob")
def _backward(ctx, grad_logp, grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]  # a frozen lm_head skips the grad_weight GEMMs
    if not any(mask):
        return None, None, None, None
    # An output that did not reach the loss has no gradient; it contributes nothing.
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    grad_hidden, grad_weight = ops.linear_logprob_backward(
        grad_logp.contiguous(), grad_lse.contiguous(), hidden, weight, targets, lse, ctx.ignore_index, mask
    )
    return grad_hidden, grad_weight, None, None


torch.library.register_autograd("h3fusion::linear_logprob_forward", _backward, setup_context=_setup_context)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under a linear head, chunked over the vocabulary.

    ``logp_n = h_n . W[t_n] - logsumexp_v(h_n . W[v])`` for every row n with ``t_n != ignore_index``; ignored rows
    give 0 and no gradient through ``logp``. The logits are computed one vocabulary chunk (and, at very large N,
    one row block) at a time with an online logsumexp, so at most one ``[rows, chunk]`` block of logits exists;
    the backward recomputes them chunk by chunk. Accumulation is fp32 for bf16/fp16/fp32 and fp64 for fp64.
    Deterministic: the same inputs give bitwise-identical results.

    ``lse_n = logsumexp_v(h_n . W[v])`` is defined for every row, ignored rows included, and is differentiable:
    a gradient reaching ``lse`` (e.g. from an entropy or z-loss term) flows to ``hidden`` and ``weight`` for all
    rows, ignored or not. Only the ``logp`` part of an ignored row is cut.

    Under ``torch.autocast`` both ``hidden`` and ``weight`` are cast to the autocast dtype first (as ``F.linear``
    would be), so fp32 master weights work with bf16 activations.

    Targets outside ``[0, V)`` other than ``ignore_index`` raise a ``RuntimeError`` naming ``targets`` on the CPU.
    On CUDA they cannot be checked without a host-device sync: such rows give a NaN ``logp`` (never an
    out-of-bounds read), and their backward treats them like rows without a target.

    Args:
        hidden: ``[N, H]`` float32, bfloat16, float16 or float64 hidden states.
        weight: ``[V, H]`` output-projection (unembedding) weight, same dtype and device as ``hidden``.
        targets: ``[N]`` int64 (or int32) target ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value whose row gives 0 and no gradient through ``logp``; an integer that fits int64
            (a float, a bool or a value outside int64 raises, naming ignore_index).
        return_lse: also return the per-row logsumexp.

    Returns:
        ``logp``: ``[N]`` float32 (float64 for float64 inputs); with ``return_lse``, ``(logp, lse)`` where ``lse`` is
        ``[N]`` of the same dtype. Differentiable with respect to ``hidden`` and ``weight`` (once: a second derivative
        raises).

    Raises:
        TypeError: a non-tensor ``hidden``/``weight``/``targets`` or a non-integer ``ignore_index``.
        ValueError: ``ignore_index`` outside int64.
        RuntimeError: bad shapes, dtypes or devices (the message names the argument), or (CPU) targets out of range.
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be tensors")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    ignore_index = int_arg(ignore_index, "ignore_index", "linear_logprob")
    check_no_forward_ad_or_func_grad("linear_logprob", hidden, weight)
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Like F.linear under autocast: both operands in the autocast dtype (the op itself has no autocast kernel).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    logp, lse = ops.linear_logprob_forward(hidden, weight, targets, ignore_index)
    return (logp, lse) if return_lse else logp
