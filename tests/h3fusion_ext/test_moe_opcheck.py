"""torch.library.opcheck on every MoE op: schema, fake kernel, autograd registration, AOT dispatch."""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext  # noqa: F401  (registers the fake kernels and autograd)
from h3fusion_ext import reference

ops = torch.ops.h3fusion
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _inputs(device, dtype=torch.float32, T=10, H=8, F=6, E=4, k=2, grad=False):
    weights, experts = reference.topk_route(torch.randn(T, E, device=device), k)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=grad)
    gu = torch.randn(E, 2 * F, H, device=device, dtype=dtype, requires_grad=grad)
    dp = torch.randn(E, H, F, device=device, dtype=dtype, requires_grad=grad)
    return x, weights.requires_grad_(grad), experts, gu, dp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route(device, renormalize):
    logits = torch.randn(12, 6, device=device, requires_grad=True)
    torch.library.opcheck(ops.topk_route, (logits, 3, renormalize))
    _, experts = reference.topk_route(logits.detach(), 3)
    torch.library.opcheck(
        ops.topk_route_backward, (torch.randn(12, 3, device=device), logits.detach(), experts, renormalize)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_route_plan_gather_combine(device):
    x, w, experts, _, _ = _inputs(device)
    torch.library.opcheck(ops.moe_route_plan, (experts, 4))
    sp, pr, _ = ops.moe_route_plan(experts, 4)
    torch.library.opcheck(ops.moe_gather, (x.requires_grad_(), sp, 2))
    rows = torch.randn(20, 8, device=device, requires_grad=True)
    torch.library.opcheck(ops.moe_combine, (rows, w.requires_grad_(), pr))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True])
def test_moe_ffn(device, grad):
    args = _inputs(device, grad=grad)
    torch.library.opcheck(ops.moe_ffn_forward, args)
    with torch.no_grad():
        y, sp, pr, off, h = ops.moe_ffn_forward(*args)
    x, w, _, gu, dp = (t.detach() for t in args)
    torch.library.opcheck(ops.moe_ffn_backward, (torch.randn_like(y), x, w, gu, dp, sp, pr, off, h))
