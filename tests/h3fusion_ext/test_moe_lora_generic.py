"""The device-generic code paths of the LoRA op (what the CUDA op runs: experts one after another, the gated
activation as ATen ops), run on the CPU through H3FUSION_LORA_GENERIC=1 so that a machine without a GPU covers them."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from lora_cases import GRAD_NAMES, make_lora_inputs, ours, run_with_grads, unmerged_lora_ffn
from torch.profiler import ProfilerActivity, profile

from h3fusion_ext import reference

pytestmark = pytest.mark.usefixtures("one_thread")
SHARED = pytest.mark.parametrize("shared", [False, True], ids=["per-expert-base", "shared-base"])


@pytest.fixture(autouse=True)
def generic_path(monkeypatch):
    monkeypatch.setenv("H3FUSION_LORA_GENERIC", "1")


def aten_ops_called(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {evt.key for evt in prof.key_averages()}


def test_the_switch_selects_the_aten_row_passes(monkeypatch):
    tensors, s = make_lora_inputs(12, 8, 6, 3, 2, 2)
    grad_y = torch.randn_like(tensors[0])
    generic = aten_ops_called(lambda: run_with_grads(ours, tensors, s, grad_y))
    monkeypatch.delenv("H3FUSION_LORA_GENERIC")
    vectorised = aten_ops_called(lambda: run_with_grads(ours, tensors, s, grad_y))
    assert "aten::silu_backward" in generic and "aten::silu_backward" not in vectorised


@SHARED
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize(
    "shape,skip",
    [((40, 16, 24, 4, 2, 3), ()), ((20, 8, 6, 6, 2, 1), (1, 4)), ((0, 8, 6, 4, 2, 3), ()), ((9, 8, 6, 3, 3, 2), ())],
    ids=["plain", "empty experts r=1", "T=0", "k=E"],
)
def test_fp64_matches_reference(shared, activation, shape, skip):
    tensors, s = make_lora_inputs(*shape, torch.float64, shared=shared, w_dtype=torch.float64, skip_experts=skip)
    grad_y = torch.randn_like(tensors[0])
    y, grads = run_with_grads(ours, tensors, s, grad_y, activation)
    ref_y, ref_grads = run_with_grads(reference.moe_lora_ffn, tensors, s, grad_y, activation)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-10)
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


@SHARED
@pytest.mark.parametrize(
    "requires",
    [(True, True, False, False, True, True, True, True), (False, True, False, False, False, False, False, False)],
    ids=["lora", "weights-only"],
)
def test_masks_equal_full_gradients(shared, requires):
    tensors, s = make_lora_inputs(24, 16, 12, 4, 2, 3, shared=shared)
    grad_y = torch.randn_like(tensors[0])
    _, full = run_with_grads(ours, tensors, s, grad_y)
    _, part = run_with_grads(ours, tensors, s, grad_y, requires=requires)
    for name, need, g_full, g_part in zip(GRAD_NAMES, requires, full, part, strict=True):
        assert (g_part is not None) == need, name
        if need:
            assert torch.equal(g_part, g_full), name


@SHARED
def test_bf16_tolerance_rule(shared):
    tensors, s = make_lora_inputs(48, 32, 40, 6, 2, 8, torch.bfloat16, shared=shared)
    grad_y = torch.randn_like(tensors[0])
    y, grads = run_with_grads(ours, tensors, s, grad_y)
    ref_lp, ref_lp_grads = run_with_grads(unmerged_lora_ffn, tensors, s, grad_y)
    hi = tuple(t.double() if t.is_floating_point() else t for t in tensors)
    ref_hp, ref_hp_grads = run_with_grads(reference.moe_lora_ffn, hi, s, grad_y.double())
    assert_close_to_reference(y, ref_lp, ref_hp, factor=2.0, what="y")
    for name, g, glp, ghp in zip(GRAD_NAMES, grads, ref_lp_grads, ref_hp_grads, strict=True):
        assert_close_to_reference(g, glp, ghp, factor=3.0, atol=1e-5, what=f"grad {name}")
