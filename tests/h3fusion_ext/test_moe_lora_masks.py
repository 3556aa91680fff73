"""Gradients only where needed for moe_ffn with LoRA: autograd hands moe_lora_ffn_backward an output_mask, every mask
gives the full path's values for what it computes and None for the rest, and a frozen base really skips its
weight-gradient GEMMs (counted with the profiler, no timing)."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_cases import GRAD_NAMES, make_lora_inputs, ours, run_with_grads
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from h3fusion_ext._library import ops

pytestmark = pytest.mark.usefixtures("one_thread")
SHARED = pytest.mark.parametrize("shared", [False, True], ids=["per-expert-base", "shared-base"])
MASKS = [m for m in itertools.product((False, True), repeat=8) if any(m)]


class BackwardMasks(TorchDispatchMode):
    """Records the output_mask of every moe_lora_ffn_backward call made under it."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is ops.moe_lora_ffn_backward.default:
            # An argument equal to its default may reach the dispatcher left out (the all-True mask).
            mask = args[17] if len(args) > 17 else (kwargs or {}).get("output_mask", (True,) * 8)
            self.masks.append(tuple(mask))
        return func(*args, **(kwargs or {}))


GEMM_EVENTS = ("aten::mm", "aten::addmm", "aten::addmm_", "h3fusion::small_gemm")


def mm_calls(fn) -> int:
    """GEMMs that fn() runs, as the profiler records them: BLAS ones (aten::mm, aten::addmm, aten::addmm_) and the CPU
    kernels' own small-row ones (h3fusion::small_gemm)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(evt.count for evt in prof.key_averages() if evt.key in GEMM_EVENTS)


@SHARED
def test_every_mask_equals_full_gradients(shared):
    tensors, s = make_lora_inputs(24, 16, 12, 4, 2, 3, shared=shared)
    grad_y = torch.randn_like(tensors[0])
    _, full = run_with_grads(ours, tensors, s, grad_y)
    for mask in MASKS:
        _, part = run_with_grads(ours, tensors, s, grad_y, requires=mask)
        for name, need, g_full, g_part in zip(GRAD_NAMES, mask, full, part, strict=True):
            if need:
                assert torch.equal(g_part, g_full), f"grad {name} differs from the full path under mask {mask}"
            else:
                assert g_part is None, f"{name} under mask {mask}"


@SHARED
@pytest.mark.parametrize(
    "requires",
    [
        (True, True, False, False, True, True, True, True),  # LoRA training: base frozen, router and adapters train
        (False, False, False, False, True, True, True, True),  # only the adapters
        (False, True, False, False, False, False, False, False),  # only the routing weights
        (True,) * 8,
    ],
    ids=["lora", "adapters-only", "weights-only", "all"],
)
def test_autograd_passes_the_mask_to_the_op(shared, requires):
    tensors, s = make_lora_inputs(20, 8, 6, 4, 2, 2, shared=shared)
    x, w, e, *rest = (t.detach().clone() for t in tensors)
    leaves = [x, w, *rest]
    for t, need in zip(leaves, requires, strict=True):
        t.requires_grad_(need)
    y = ours(x, w, e, *rest, s)
    with BackwardMasks() as mode:
        y.backward(torch.randn_like(y))
    assert mode.masks == [requires]
    for name, t, need in zip(GRAD_NAMES, leaves, requires, strict=True):
        assert (t.grad is not None) == need, name


@SHARED
def test_frozen_base_skips_the_base_weight_gradient_gemms(shared):
    tensors, s = make_lora_inputs(32, 16, 12, 4, 2, 3, shared=shared)
    offsets = ops.moe_route_plan(tensors[2], 4)[2]
    active = int((offsets[1:] > offsets[:-1]).sum())
    grad_y = torch.randn_like(tensors[0])
    lora_mask = (True, True, False, False, True, True, True, True)
    n_frozen = mm_calls(lambda: run_with_grads(ours, tensors, s, grad_y, requires=lora_mask))
    n_full = mm_calls(lambda: run_with_grads(ours, tensors, s, grad_y))
    # grad_gate_up_proj and grad_down_proj: one GEMM each per active expert, or one each over the tokens when shared.
    assert n_full - n_frozen == (2 if shared else 2 * active)


def test_backward_op_returns_undefined_for_masked_gradients():
    tensors, s = make_lora_inputs(16, 8, 6, 3, 2, 2)
    y, *saved = ops.moe_lora_ffn_forward(*tensors, s, "silu", True)
    args = (torch.randn_like(y), *tensors[:2], *tensors[3:], s, "silu", *saved)
    full = ops.moe_lora_ffn_backward(*args)
    for mask in ([False] * 8, [True, False, False, True, False, True, False, False]):
        outs = ops.moe_lora_ffn_backward(*args, mask)
        for need, out, ref in zip(mask, outs, full, strict=True):
            assert (out is not None) == need
            if need:
                assert torch.equal(out, ref)


def test_fake_kernel_follows_the_mask():
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensors, s = make_lora_inputs(12, 8, 6, 3, 2, 2, shared=True)
    y, *saved = ops.moe_lora_ffn_forward(*tensors, s, "silu", True)
    mask = [True, False, False, True, False, True, False, False]
    with FakeTensorMode(allow_non_fake_inputs=True):
        outs = ops.moe_lora_ffn_backward(y, *tensors[:2], *tensors[3:], s, "silu", *saved, mask)
    like = tensors[:2] + tensors[3:]
    for need, out, t in zip(mask, outs, like, strict=True):
        assert (out is None) != need
        if need:
            assert out.shape == t.shape and out.dtype == t.dtype
