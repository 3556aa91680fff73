"""Gradients only where needed: moe_ffn_backward / linear_logprob_backward take an output_mask from autograd.

Every mask gives exactly the full-gradient path's values for what it computes, None for the rest, and the skipped
GEMMs are really skipped (counted as aten::mm calls in the profiler, no timing involved). Also: a forward without
autograd keeps no pre-activation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import h3fusion_ext
from h3fusion_ext import reference
from h3fusion_ext._library import ops

pytestmark = pytest.mark.usefixtures("one_thread")  # one thread: every expert runs serially, all GEMMs on this thread

NAMES = ("x", "weights", "gate_up_proj", "down_proj")
MASKS = [m for m in itertools.product((False, True), repeat=4) if any(m)]


def moe_inputs(T=24, H=16, F=12, E=4, k=2, dtype=torch.float32):
    weights, experts = reference.topk_route(torch.randn(T, E), k)
    x = torch.randn(T, H, dtype=dtype)
    gate_up = (torch.randn(E, 2 * F, H) / H**0.5).to(dtype)
    down = (torch.randn(E, H, F) / F**0.5).to(dtype)
    return x, weights, experts, gate_up, down


def moe_grads(inputs, mask, grad_y):
    x, w, e, gu, dp = (t.detach().clone() for t in inputs)
    leaves = [t.requires_grad_(need) for t, need in zip((x, w, gu, dp), mask, strict=True)]
    y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
    y.backward(grad_y)
    return [t.grad for t in leaves]


GEMM_EVENTS = ("aten::mm", "aten::addmm", "aten::addmm_", "h3fusion::small_gemm")


def mm_calls(fn) -> int:
    """GEMMs that fn() runs, as the profiler records them: BLAS ones (aten::mm, aten::addmm, aten::addmm_) and the CPU
    kernels' own small-row ones (h3fusion::small_gemm)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(evt.count for evt in prof.key_averages() if evt.key in GEMM_EVENTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_moe_ffn_every_mask_equals_full_gradients(mask, dtype):
    inputs = moe_inputs(dtype=dtype)
    grad_y = torch.randn_like(inputs[0])
    full = moe_grads(inputs, (True,) * 4, grad_y)
    part = moe_grads(inputs, mask, grad_y)
    for name, need, g_full, g_part in zip(NAMES, mask, full, part, strict=True):
        if need:
            assert torch.equal(g_part, g_full), f"grad {name} differs from the full-gradient path under mask {mask}"
        else:
            assert g_part is None, name


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_moe_ffn_backward_op_returns_undefined_and_skips_gemms(mask):
    E = 4
    x, w, e, gu, dp = moe_inputs(T=32, E=E)
    y, sp, pr, off, h = ops.moe_ffn_forward(x, w, e, gu, dp)
    active = int((off[1:] > off[:-1]).sum())
    grad_y = torch.randn_like(y)
    outs = []
    n_mm = mm_calls(lambda: outs.extend(ops.moe_ffn_backward(grad_y, x, w, gu, dp, sp, pr, off, h, list(mask))))
    for name, need, out, like in zip(NAMES, mask, outs, (x, w, gu, dp), strict=True):
        assert (out is not None) == need, name
        if need:
            assert out.shape == like.shape and out.dtype == like.dtype, name
    need_x, need_w, need_gu, need_down = mask
    # Per active expert: U = grad_y @ W_down (for x, weights, gate_up_proj), grad_down, grad_gate_up, grad_x rows.
    per_expert = int(need_x or need_w or need_gu) + int(need_down) + int(need_gu) + int(need_x)
    assert n_mm == per_expert * active


def test_moe_ffn_frozen_experts_skip_weight_gradient_gemms():
    inputs = moe_inputs(T=32)
    x, w, e, gu, dp = (t.detach().clone() for t in inputs)
    x.requires_grad_()
    w.requires_grad_()  # LoRA-style: expert weights frozen, activations and routing train
    y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
    n_frozen = mm_calls(lambda: y.backward(torch.ones_like(y)))
    gu.requires_grad_()
    dp.requires_grad_()
    y2 = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
    n_full = mm_calls(lambda: y2.backward(torch.ones_like(y2)))
    assert gu.grad is not None and n_frozen * 2 == n_full  # 2 of the 4 backward GEMMs per expert remain


def test_moe_ffn_fake_kernel_follows_the_mask():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, e, gu, dp = moe_inputs()
    y, sp, pr, off, h = ops.moe_ffn_forward(x, w, e, gu, dp)
    with FakeTensorMode(allow_non_fake_inputs=True):
        outs = ops.moe_ffn_backward(y, x, w, gu, dp, sp, pr, off, h, [True, False, False, True])
    assert outs[1] is None and outs[2] is None
    assert outs[0].shape == x.shape and outs[3].shape == dp.shape


@pytest.mark.parametrize("T", [24, 300])  # experts with a handful of rows (skinny GEMM) and with many (BLAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_ffn_forward_without_autograd_keeps_no_pre_activation(T, dtype):
    x, w, e, gu, dp = moe_inputs(T=T, F=40, dtype=dtype)
    _, *_, h_saved = ops.moe_ffn_forward(x, w, e, gu, dp, True)
    y_nosave, *plan, h_none = ops.moe_ffn_forward(x, w, e, gu, dp, False)
    assert h_saved.shape == (x.shape[0] * w.shape[1], gu.shape[1]) and h_none.shape == (0, gu.shape[1])
    with torch.no_grad():
        assert torch.equal(h3fusion_ext.moe_ffn(x, w, e, gu, dp), y_nosave)
    gu.requires_grad_()
    y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)  # with autograd: the same value, and the buffer for the backward
    assert torch.equal(y.detach(), y_nosave)
    with pytest.raises(RuntimeError, match="save_pre_activation=False"):
        ops.moe_ffn_backward(torch.ones_like(x), x, w, gu.detach(), dp, *plan, h_none)


# ---- linear_logprob --------------------------------------------------------------------------------------------


def logprob_grads(hidden, weight, targets, mask):
    h = hidden.detach().clone().requires_grad_(mask[0])
    w = weight.detach().clone().requires_grad_(mask[1])
    logp = h3fusion_ext.linear_logprob(h, w, targets)
    n = mm_calls(lambda: logp.sum().backward())
    return h.grad, w.grad, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_frozen_head_skips_grad_weight(dtype, monkeypatch):
    monkeypatch.setenv("H3FUSION_LOGPROB_VOCAB_CHUNK", "16")  # several chunks: the skip holds per chunk
    hidden, weight = torch.randn(12, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype)
    targets = torch.randint(0, 50, (12,))
    gh_full, gw_full, n_full = logprob_grads(hidden, weight, targets, (True, True))
    gh, gw, n_frozen = logprob_grads(hidden, weight, targets, (True, False))
    assert gw is None and torch.equal(gh, gh_full)
    gh2, gw2, n_hidden_frozen = logprob_grads(hidden, weight, targets, (False, True))
    assert gh2 is None and torch.equal(gw2, gw_full)
    assert n_frozen < n_full and n_hidden_frozen < n_full  # the skipped GEMMs are not run


def test_linear_logprob_backward_op_mask():
    hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
    targets = torch.randint(0, 10, (6,))
    logp, lse = ops.linear_logprob_forward(hidden, weight, targets, -100)
    args = (torch.ones_like(logp), torch.zeros_like(lse), hidden, weight, targets, lse, -100)
    full = ops.linear_logprob_backward(*args)
    for mask in ([True, False], [False, True], [False, False]):
        outs = ops.linear_logprob_backward(*args, mask)
        for need, out, ref in zip(mask, outs, full, strict=True):
            assert (out is None) != need
            if need:
                assert torch.equal(out, ref)
