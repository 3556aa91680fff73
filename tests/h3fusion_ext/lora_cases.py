"""Inputs and a gradient runner for the moe_ffn-with-LoRA tests (one home for the tests of the LoRA op)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import h3fusion_ext
from h3fusion_ext import ExpertLoRA, reference

# The differentiable inputs, in the order of moe_lora_ffn_backward's output_mask.
GRAD_NAMES = ("x", "weights", "gate_up_proj", "down_proj", "gate_up_a", "gate_up_b", "down_a", "down_b")


def make_lora_inputs(
    T,
    H,
    F,
    E,
    k,
    r,
    dtype=torch.float32,
    *,
    shared=False,
    device="cpu",
    w_dtype=None,
    skip_experts=(),
    scaling=None,
    generator=None,
):
    """Random inputs (x, weights, experts, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b), scaling.

    Routing from real logits (distinct experts per token when k <= E); the experts in `skip_experts` get no token.
    A shared base has leading dimension 1. B is random too (not PEFT's zero init), so every term is exercised.
    """
    gen = dict(generator=generator, device=device)

    def randn(*shape):
        return torch.randn(*shape, **gen)

    logits = randn(T, E)
    if skip_experts:
        logits[:, list(skip_experts)] = -1e4
    weights, experts = reference.topk_route(logits, k)
    Eb = 1 if shared else E
    x = randn(T, H).to(dtype)
    gate_up = (randn(Eb, 2 * F, H) / H**0.5).to(dtype)
    down = (randn(Eb, H, F) / F**0.5).to(dtype)
    gate_up_a = (randn(E, r, H) / H**0.5).to(dtype)
    gate_up_b = (randn(E, 2 * F, r) / r**0.5).to(dtype)
    down_a = (randn(E, r, F) / F**0.5).to(dtype)
    down_b = (randn(E, H, r) / r**0.5).to(dtype)
    if scaling is None:
        scaling = 0.5 + torch.rand((), generator=generator).item()
    tensors = (x, weights.to(w_dtype or torch.float32), experts, gate_up, down, gate_up_a, gate_up_b, down_a, down_b)
    return tensors, scaling


def ours(x, w, e, gu, dp, a1, b1, a2, b2, scaling, activation="silu"):
    """The public API: moe_ffn with an ExpertLoRA."""
    return h3fusion_ext.moe_ffn(x, w, e, gu, dp, lora=ExpertLoRA(a1, b1, a2, b2, scaling), activation=activation)


def unmerged_lora_ffn(x, w, e, gu, dp, a1, b1, a2, b2, scaling, activation="silu"):
    """The same layer as PyTorch runs it with unmerged adapters (PEFT's order: base(x) + s * B(A(x))), per expert.

    The low-precision baseline of the tolerance rule: `reference.moe_lora_ffn` (the oracle) rounds the materialised
    W + s B A instead, a different but equally plain computation whose own bf16 error is not the fair yardstick for a
    kernel that never forms that sum.
    """
    y = torch.zeros_like(x)
    e = e.long()
    for ex in range(a1.shape[0]):
        ti, si = torch.where(e == ex)
        if ti.numel() == 0:
            continue
        b = 0 if gu.shape[0] == 1 else ex
        xe = x[ti]
        h = F.linear(xe, gu[b]) + scaling * F.linear(F.linear(xe, a1[ex]), b1[ex])
        act = reference.gated_activation(*h.chunk(2, dim=-1), activation)
        o = F.linear(act, dp[b]) + scaling * F.linear(F.linear(act, a2[ex]), b2[ex])
        y = y.index_add(0, ti, (o * w[ti, si, None].to(o.dtype)).to(y.dtype))
    return y


def run_with_grads(fn, tensors, scaling, grad_y, activation="silu", requires=(True,) * 8):
    """y and the gradients of the 8 differentiable inputs (None for those not requiring grad) under fn."""
    x, w, e, *rest = (t.detach().clone() for t in tensors)
    leaves = [x, w, *rest]
    for t, need in zip(leaves, requires, strict=True):
        t.requires_grad_(need)
    y = fn(x, w, e, *rest, scaling, activation)
    if not any(requires):
        assert not y.requires_grad
        return y, [None] * 8
    if not y.requires_grad:
        # Only the reference may return a constant (its output when no expert has a token); our op's output must
        # always be differentiable, so a zero substitute there would hide a broken autograd registration.
        assert fn in (reference.moe_lora_ffn, unmerged_lora_ffn) and x.shape[0] == 0, "y does not require grad"
        return y.detach(), [torch.zeros_like(t) if need else None for t, need in zip(leaves, requires, strict=True)]
    y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves]
