"""Bitwise determinism across torch thread counts, and torch.compile through the backward (issue 14, item 6).

The run-to-run determinism tests elsewhere use one thread count; these switch between 1 and 2 threads, which
changes how the CPU kernels split their work (tokens, experts, vocabulary chunks, BLAS) and must not change a bit.
"""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext
from h3fusion_ext import reference


def with_threads(n, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def assert_bitwise_equal_across_threads(fn):
    one, two = with_threads(1, fn), with_threads(2, fn)
    assert len(one) == len(two)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads: max diff {(a - b).abs().max()}"


def moe_ffn_inputs(T, H, F, E, k, dtype=torch.float32):
    weights, experts = reference.topk_route(torch.randn(T, E), k)
    x = torch.randn(T, H, dtype=dtype)
    gate_up = (torch.randn(E, 2 * F, H) / H**0.5).to(dtype)
    down = (torch.randn(E, H, F) / F**0.5).to(dtype)
    return x, weights, experts, gate_up, down


# (T, H, F, E, k), by how the CPU op splits the work (csrc/cpu/moe_ffn.cpp; token groups in bf16 only, fp32 takes one
# group and threads inside every forward GEMM: BLAS's, or on AVX2 CPUs large_nt's split of the weight rows):
#   token-groups: 512 rows per expert, two token groups in the forward (one per thread at 2 threads); four active
#     experts, so the backward runs one group of experts per thread;
#   blas-threaded-backward: two large experts, token groups in the forward, BLAS threads in the backward;
#   more-groups-than-threads: 1024 rows per expert, four token groups, two per thread;
#   blas-threaded: 384 rows per expert, one token group: threads inside every forward GEMM (fp32 on AVX2: large_nt);
#   per-expert: many small experts, one expert per thread;
#   few-rows: decode, no expert above 8 rows: the threads split every expert's weights in 64-column units;
# each large enough that two threads really split the work.
@pytest.mark.parametrize(
    "shape",
    [
        (1024, 64, 96, 4, 2),
        (1024, 64, 96, 2, 1),
        (2048, 32, 48, 2, 1),
        (768, 64, 96, 4, 2),
        (256, 16, 8, 32, 4),
        (6, 150, 200, 8, 2),
    ],
    ids=[
        "token-groups",
        "blas-threaded-backward",
        "more-groups-than-threads",
        "blas-threaded",
        "per-expert",
        "few-rows",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_ffn_same_bits_for_1_and_2_threads(shape, dtype):
    inputs = moe_ffn_inputs(*shape, dtype=dtype)
    grad_y = torch.randn_like(inputs[0])

    def run():
        x, w, e, gu, dp = (t.clone() for t in inputs)
        leaves = [t.requires_grad_() for t in (x, w, gu, dp)]
        y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]

    assert_bitwise_equal_across_threads(run)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route_same_bits_for_1_and_2_threads(renormalize):
    logits = torch.randn(777, 16) * 3
    grad_w = torch.randn(777, 4)

    def run():
        z = logits.clone().requires_grad_()
        w, e = h3fusion_ext.topk_route(z, 4, renormalize)
        return [w.detach(), e, *torch.autograd.grad(w, z, grad_w)]

    assert_bitwise_equal_across_threads(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_same_bits_for_1_and_2_threads(dtype):
    N, H, V = 96, 32, 3000
    hidden, weight = torch.randn(N, H, dtype=dtype), (torch.randn(V, H) / H**0.25).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[::7] = -100
    grad_logp, grad_lse = torch.randn(N), torch.randn(N)

    def run():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, lse = h3fusion_ext.linear_logprob(h, w, targets, return_lse=True)
        grads = torch.autograd.grad((logp * grad_logp).sum() + (lse * grad_lse).sum(), (h, w))
        return [logp.detach(), lse.detach(), *grads]

    assert_bitwise_equal_across_threads(run)


# ---- torch.compile through backward ------------------------------------------------------------------------------


def moe_then_logprob(x, logits, gate_up, down, head, targets):
    """A tiny MoE layer and LM head: every public op, routed + expert FFN + log-probs, to a scalar loss."""
    w, e = h3fusion_ext.topk_route(logits, 2)
    y = h3fusion_ext.moe_ffn(x, w, e, gate_up, down)
    logp, lse = h3fusion_ext.linear_logprob(y, head, targets, return_lse=True)
    return -(logp.sum()) + 1e-2 * (lse**2).sum()


def test_compile_fullgraph_through_backward_matches_eager():
    T, H, F, E, V = 24, 16, 12, 4, 50
    x, logits = torch.randn(T, H), torch.randn(T, E)
    gate_up, down = torch.randn(E, 2 * F, H) / H**0.5, torch.randn(E, H, F) / F**0.5
    head = torch.randn(V, H) / H**0.5
    targets = torch.randint(0, V, (T,))
    targets[3] = -100

    def loss_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, logits, gate_up, down, head)]
        loss = fn(*leaves, targets)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(moe_then_logprob, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = loss_and_grads(compiled)
    loss_e, grads_e = loss_and_grads(moe_then_logprob)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for name, gc, ge in zip(("x", "logits", "gate_up", "down", "head"), grads_c, grads_e, strict=True):
        assert gc is not None and gc.abs().max() > 0, name
        torch.testing.assert_close(gc, ge, rtol=0, atol=0, msg=lambda m, n=name: f"grad {n}: {m}")
