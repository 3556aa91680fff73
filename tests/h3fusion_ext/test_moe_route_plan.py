"""moe_route_plan, moe_gather, moe_combine: exact index outputs vs the reference, permutation invariants, grads."""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext
from h3fusion_ext import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _random_experts(T, k, E, device, skip=()):
    # Distinct experts per token (as topk_route gives), drawn from the experts not in `skip`.
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    scores = torch.rand(T, allowed.numel())
    return allowed[scores.argsort(dim=1)[:, :k]].to(torch.int32).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", [(50, 8, 2), (7, 16, 4), (0, 4, 2), (5, 1, 1), (9, 3, 3), (1, 64, 8)])
def test_plan_matches_reference_exactly(device, T, E, k):
    experts = _random_experts(T, k, E, device)
    sp, pr, off = h3fusion_ext.moe_route_plan(experts, E)
    ref = reference.moe_route_plan(experts, E)
    assert (sp.dtype, pr.dtype, off.dtype) == (torch.int32, torch.int32, torch.int64)
    assert torch.equal(sp, ref[0]) and torch.equal(pr, ref[1]) and torch.equal(off, ref[2])


@pytest.mark.parametrize("device", DEVICES)
def test_plan_invariants_and_empty_experts(device):
    T, E, k = 40, 10, 3
    experts = _random_experts(T, k, E, device, skip=(0, 4, 9))  # experts 0, 4 and 9 get no tokens
    sp, pr, off = (t.cpu() for t in h3fusion_ext.moe_route_plan(experts, E))
    flat = experts.cpu().reshape(-1).long()
    assert torch.equal(pr[sp.long()], torch.arange(T * k, dtype=torch.int32)), "pair_rows must invert sorted_pairs"
    assert off[0] == 0 and off[-1] == T * k
    counts = off[1:] - off[:-1]
    assert torch.equal(counts, torch.bincount(flat, minlength=E))
    assert counts[0] == counts[4] == counts[9] == 0
    for e in range(E):
        pairs = sp[off[e] : off[e + 1]].long()
        assert bool((flat[pairs] == e).all())
        assert bool((pairs[1:] > pairs[:-1]).all()), "pairs of one expert must stay in ascending order (stable)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_and_combine_match_reference(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is a CPU-only dtype")
    T, H, E, k = 33, 19, 6, 2
    experts = _random_experts(T, k, E, device)
    sp, pr, _ = h3fusion_ext.moe_route_plan(experts, E)
    x = torch.randn(T, H, dtype=dtype, device=device)
    assert torch.equal(h3fusion_ext.moe_gather(x, sp, k), reference.moe_gather(x, sp, k))
    rows = torch.randn(T * k, H, dtype=dtype, device=device)
    for w_dtype in {torch.float32, dtype}:
        w = torch.rand(T, k, dtype=w_dtype, device=device)
        ours = h3fusion_ext.moe_combine(rows, w, pr)
        ref = reference.moe_combine(rows, w, pr)
        assert ours.dtype == dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)


def test_gather_combine_gradcheck():
    T, H, E, k = 5, 4, 3, 2
    experts = _random_experts(T, k, E, "cpu")
    sp, pr, _ = h3fusion_ext.moe_route_plan(experts, E)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: h3fusion_ext.moe_gather(x, sp, k), (x,))
    rows = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: h3fusion_ext.moe_combine(r, w, pr), (rows, w))


def test_gather_then_combine_roundtrip():
    # Gathering then combining with weights summing to 1 gives back x.
    T, H, E, k = 21, 8, 5, 3
    experts = _random_experts(T, k, E, "cpu")
    sp, pr, _ = h3fusion_ext.moe_route_plan(experts, E)
    x = torch.randn(T, H, dtype=torch.float64)
    w = torch.softmax(torch.randn(T, k, dtype=torch.float64), -1)
    torch.testing.assert_close(h3fusion_ext.moe_combine(h3fusion_ext.moe_gather(x, sp, k), w, pr), x)
