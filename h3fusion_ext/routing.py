"""topk_route: the router's softmax + top-k as one op, with its fake (meta) kernel and autograd.

The kernels are `torch.ops.h3fusion.topk_route` / `topk_route_backward` (csrc/cpu/topk_route.cpp, csrc/cuda/).
"""

from __future__ import annotations

import torch

from ._arguments import check_same_device, int_arg
from ._autograd import check_no_forward_ad_or_func_grad, once_differentiable
from ._dtypes import accumulate_dtype
from ._library import ops

__all__ = ["topk_route"]


def topk_route(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its k most probable experts.

    Softmax over the experts in fp32 (fp64 for fp64 logits), the k largest probabilities with equal values going
    to the lower expert id first, in descending order; optionally rescaled to sum to 1 over the k (Mixtral's rule).
    Differentiable with respect to `logits` (once: a second derivative raises).

    Args:
        logits: [T, E] router logits, float32/bfloat16/float16/float64; must be finite.
        k: experts per token, an integer with 1 <= k <= E (a float such as 1.7, or a bool, raises a TypeError).
        renormalize: rescale the k kept probabilities to sum to 1.

    Returns:
        weights: [T, k] float32 (float64 for float64 logits), descending per token.
        experts: [T, k] int32 expert ids.

    Raises:
        RuntimeError: bad shape/dtype of `logits`, `k` outside [1, E], or (CPU) non-finite `logits`; on CUDA that
            cannot be checked without a host-device sync, and such a token gets NaN weights (k distinct valid ids).
        TypeError: `k` not an integer.
    """
    k = int_arg(k, "k", "topk_route")
    check_no_forward_ad_or_func_grad("topk_route", logits)
    return ops.topk_route(logits, k, bool(renormalize))


@torch.library.register_fake("h3fusion::topk_route")
def _topk_route_fake(logits, k, renormalize):
    acc = accumulate_dtype(logits.dtype)
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=acc), logits.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("h3fusion::topk_route_backward")
def _topk_route_backward_fake(grad_weights, logits, experts, renormalize):
    check_same_device("topk_route_backward", "logits", logits, grad_weights=grad_weights, experts=experts)
    return torch.empty_like(logits)


def _topk_route_setup(ctx, inputs, output):
    logits, _k, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize = renormalize


@once_differentiable("topk_route")
def _topk_route_backward(ctx, grad_weights, _grad_experts):
    logits, experts = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return ops.topk_route_backward(grad_weights, logits, experts, ctx.renormalize), None, None


torch.library.register_autograd("h3fusion::topk_route", _topk_route_backward, setup_context=_topk_route_setup)
