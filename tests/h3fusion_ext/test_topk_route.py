"""topk_route against the reference: exact expert ids, close weights, gradients, ties, edge cases."""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext
from h3fusion_ext import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (5, 64, 8), (9, 3, 3), (4, 1, 1), (0, 6, 2)])
def test_matches_reference(device, dtype, renormalize, T, E, k):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is a CPU-only dtype")
    logits = (torch.randn(T, E) * 3).to(dtype).to(device)
    weights, experts = h3fusion_ext.topk_route(logits, k, renormalize)
    ref_w, ref_e = reference.topk_route(logits, k, renormalize)
    assert experts.dtype == torch.int32 and experts.shape == (T, k)
    assert weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(experts, ref_e)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(weights, ref_w, atol=tol, rtol=tol)
    if T:
        assert bool((weights[:, :-1] >= weights[:, 1:]).all()), "weights must be in descending order"
        if renormalize:
            torch.testing.assert_close(weights.sum(-1), torch.ones(T, dtype=weights.dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_expert(device):
    # Few distinct values: most rows have exact ties, which must resolve to the lower id, exactly as the reference.
    logits = torch.randint(-2, 3, (200, 16)).float().to(device)
    _, experts = h3fusion_ext.topk_route(logits, 5)
    _, ref_e = reference.topk_route(logits, 5)
    assert torch.equal(experts, ref_e)
    row = torch.zeros(1, 6, device=device)
    assert h3fusion_ext.topk_route(row, 3)[1].tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_backward_matches_reference(dtype, renormalize):
    T, E, k = 23, 10, 3
    base = torch.randn(T, E).to(dtype)
    grad = torch.randn(T, k, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ours_in = base.clone().requires_grad_()
    ref_in = base.clone().requires_grad_()
    (h3fusion_ext.topk_route(ours_in, k, renormalize)[0] * grad).sum().backward()
    (reference.topk_route(ref_in, k, renormalize)[0] * grad).sum().backward()
    assert ours_in.grad.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=tol, rtol=tol)
    assert ours_in.grad.abs().sum() > 0


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(renormalize):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: h3fusion_ext.topk_route(z, 2, renormalize)[0], (logits,))


def test_deterministic():
    logits = torch.randn(300, 32)
    a = h3fusion_ext.topk_route(logits, 4)
    b = h3fusion_ext.topk_route(logits, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
