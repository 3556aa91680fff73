"""linear_logprob on CUDA: against the fp64 reference, the CPU op, without host syncs, and under CUDA-graph capture."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_close_to_reference
from logprob_cases import IGNORE, logprob_inputs, run_logprob, set_chunking

from h3fusion_ext import linear_logprob, reference

# (vocab chunk, block elements): default, 2-row blocks with 1000-id chunks, 64-row blocks with 64-id chunks.
CHUNKINGS = [None, (1000, 2000), (64, 4096)]


cuda_inputs = functools.partial(logprob_inputs, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 64, 300), (1, 16, 5000), (130, 32, 4097)])
def test_tolerance_rule_vs_fp64_reference(monkeypatch, chunking, dtype, shape):
    set_chunking(monkeypatch, chunking)
    n, h, v = shape
    hidden, weight, targets = cuda_inputs(n, h, v, dtype)
    gl, gs = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    ours = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    lowp = run_logprob(reference.linear_logprob, hidden, weight, targets, gl, gs)
    ref = run_logprob(reference.linear_logprob, hidden.double(), weight.double(), targets, gl.double(), gs.double())
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype and ours[3].dtype == dtype
    for i, name in enumerate(("logp", "lse", "grad_hidden", "grad_weight")):
        assert_close_to_reference(ours[i], lowp[i], ref[i], factor=2 if i < 2 else 3, atol=1e-5, what=f"{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("chunking", [None, (3, 7), (16, 40)])
def test_fp64_matches_cpu_op(monkeypatch, chunking):
    set_chunking(monkeypatch, chunking)
    n, h, v = 29, 12, 67
    hidden, weight, targets = cuda_inputs(n, h, v, torch.float64)
    gl, gs = torch.randn(n, dtype=torch.float64, device="cuda"), torch.randn(n, dtype=torch.float64, device="cuda")
    gpu = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    cpu = run_logprob(linear_logprob, hidden.cpu(), weight.cpu(), targets.cpu(), gl.cpu(), gs.cpu())
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
def test_gradcheck_cuda_fp64(monkeypatch):
    set_chunking(monkeypatch, (3, 7))
    hidden, weight, targets = cuda_inputs(5, 3, 8, torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: linear_logprob(h, w, targets, return_lse=True), (hidden, weight))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    n, h, v = 200, 64, 9000
    hidden, weight, targets = cuda_inputs(n, h, v, dtype)
    gl, gs = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    first = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    second = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_edge_cases_empty_and_all_ignored():
    hidden, weight, targets = cuda_inputs(0, 8, 50, torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, lse = linear_logprob(h, w, targets, return_lse=True)
    assert logp.shape == (0,) and lse.shape == (0,)
    (logp.sum() + lse.sum()).backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))

    hidden, weight, targets = cuda_inputs(9, 8, 50, torch.float32)
    targets[:] = IGNORE
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprob(h, w, targets)
    assert torch.equal(logp, torch.zeros_like(logp))
    logp.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.cuda
def test_out_of_range_target_gives_nan_not_a_crash():
    # Documented: CUDA cannot raise without a host sync; the bad row's logp is NaN and the others are unaffected.
    hidden, weight, targets = cuda_inputs(6, 8, 20, torch.float32, ignore_frac=0.0)
    targets[1] = 20
    targets[4] = -7
    logp = linear_logprob(hidden, weight, targets)
    torch.cuda.synchronize()
    assert torch.isnan(logp[1]) and torch.isnan(logp[4])
    good = torch.tensor([0, 2, 3, 5], device="cuda")
    ref = reference.linear_logprob(hidden[good].double(), weight.double(), targets[good])
    torch.testing.assert_close(logp[good].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_device_mismatch_names_the_argument():
    hidden, weight, targets = cuda_inputs(4, 8, 20, torch.float32)
    with pytest.raises(RuntimeError, match="targets"):
        linear_logprob(hidden, weight, targets.cpu())
    with pytest.raises(RuntimeError, match="weight"):
        linear_logprob(hidden, weight.cpu(), targets)


@pytest.mark.cuda
def test_no_host_sync():
    hidden, weight, targets = cuda_inputs(64, 32, 5000, torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    gl = torch.randn(64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logp, lse = linear_logprob(h, w, targets, return_lse=True)
        ((logp * gl).sum() + lse.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    n, h, v = 48, 32, 4500
    hidden, weight, targets = cuda_inputs(n, h, v, torch.bfloat16)
    grad_logp, grad_lse = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    fwd = torch.ops.h3fusion.linear_logprob_forward
    bwd = torch.ops.h3fusion.linear_logprob_backward

    def step():
        logp, lse = fwd(hidden, weight, targets, IGNORE)
        gh, gw = bwd(grad_logp, grad_lse, hidden, weight, targets, lse, IGNORE)
        return logp, lse, gh, gw

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (cuBLAS workspaces) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    # New values in the captured input buffers; the replay must match eager on them.
    hidden.copy_(torch.randn_like(hidden))
    weight.copy_(torch.randn_like(weight))
    targets.copy_(torch.randint(0, v, (n,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static_out, eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_opcheck_cuda():
    hidden, weight, targets = cuda_inputs(6, 8, 30, torch.float32)
    fwd_args = (hidden.requires_grad_(), weight.requires_grad_(), targets, IGNORE)
    torch.library.opcheck(torch.ops.h3fusion.linear_logprob_forward.default, fwd_args)
    _, lse = torch.ops.h3fusion.linear_logprob_forward(*fwd_args)
    bwd_args = (
        torch.randn(6, device="cuda"),
        torch.randn(6, device="cuda"),
        hidden.detach(),
        weight.detach(),
        targets,
        lse.detach(),
        IGNORE,
    )
    torch.library.opcheck(torch.ops.h3fusion.linear_logprob_backward.default, bwd_args)
