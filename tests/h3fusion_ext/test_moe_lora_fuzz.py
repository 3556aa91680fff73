"""Hypothesis shape fuzzing of moe_ffn with LoRA against reference.moe_lora_ffn (fp64, so any mismatch is a bug):
random T, H, F, E, k, r, per-expert or shared base, activation, and which inputs require grad."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_cases import GRAD_NAMES, make_lora_inputs, ours, run_with_grads

from h3fusion_ext import reference

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def lora_cases(draw):
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, E))
    shape = (
        draw(st.integers(0, 40)),
        draw(st.integers(1, 20)),
        draw(st.integers(1, 20)),
        E,
        k,
        draw(st.integers(1, 6)),
    )
    requires = tuple(draw(st.lists(st.booleans(), min_size=8, max_size=8)))
    return shape, draw(st.booleans()), draw(st.sampled_from(["silu", "gelu", "gelu_tanh"])), requires


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=lora_cases(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(case, seed):
    shape, shared, activation, requires = case
    gen = torch.Generator().manual_seed(seed)
    tensors, s = make_lora_inputs(*shape, torch.float64, shared=shared, w_dtype=torch.float64, generator=gen)
    grad_y = torch.randn(tensors[0].shape, generator=gen, dtype=torch.float64)
    y, grads = run_with_grads(ours, tensors, s, grad_y, activation, requires)
    ref_y, ref_grads = run_with_grads(reference.moe_lora_ffn, tensors, s, grad_y, activation, (True,) * 8)
    torch.testing.assert_close(y, ref_y, atol=1e-10, rtol=1e-9)
    for name, need, g, rg in zip(GRAD_NAMES, requires, grads, ref_grads, strict=True):
        if not need:
            assert g is None, name
        else:
            torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"grad {n}: {m}")
