"""Hypothesis shape fuzzing of the MoE ops against the reference (fp64, so any mismatch is a real bug)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import h3fusion_ext
from h3fusion_ext import reference


@st.composite
def moe_shapes(draw):
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, E))
    return draw(st.integers(0, 40)), draw(st.integers(1, 20)), draw(st.integers(1, 20)), E, k, draw(st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=moe_shapes(), seed=st.integers(0, 2**31 - 1))
def test_moe_layer_matches_reference(shape, seed):
    T, H, F, E, k, renormalize = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    gu = torch.randn(E, 2 * F, H, generator=gen, dtype=torch.float64, requires_grad=True)
    dp = torch.randn(E, H, F, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(T, H, generator=gen, dtype=torch.float64)

    def layer(mod):
        w, e = mod.topk_route(logits, k, renormalize)
        y = mod.moe_ffn(x, w, e, gu, dp)
        if not y.requires_grad:  # only the reference may return a constant (a plain zeros tensor at T = 0)
            assert mod is reference and T == 0, f"{mod.__name__}.moe_ffn: y does not require grad"
            return e, y, (None,) * 4
        return e, y, torch.autograd.grad(y, (logits, x, gu, dp), grad_y, allow_unused=True)

    e, y, grads = layer(h3fusion_ext)
    ref_e, ref_y, ref_grads = layer(reference)
    assert torch.equal(e, ref_e)
    torch.testing.assert_close(y, ref_y, atol=1e-10, rtol=1e-9)
    for g, rg, t in zip(grads, ref_grads, (logits, x, gu, dp), strict=True):
        g = torch.zeros_like(t) if g is None else g
        rg = torch.zeros_like(t) if rg is None else rg
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-9)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(0, 300), E=st.integers(1, 70), data=st.data())
def test_route_plan_matches_reference(T, E, data):
    k = data.draw(st.integers(1, min(E, 8)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    experts = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    ours = h3fusion_ext.moe_route_plan(experts, E)
    ref = reference.moe_route_plan(experts, E)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
