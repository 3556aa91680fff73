"""CUDA kernels of topk_route(+backward), moe_route_plan, moe_gather, moe_combine against the reference and the CPU op.

Every test here needs a GPU (the module is marked `cuda`; conftest skips it with a reason elsewhere). The ops are
called as `torch.ops.h3fusion.*` directly, so the CUDA kernels are tested whatever the Python wrappers do.
Index outputs must match exactly; float outputs follow the flash-attention tolerance rule or a tight allclose.
"""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext  # noqa: F401  (loads the op library)
from h3fusion_ext import reference as ref

pytestmark = pytest.mark.cuda

ops = torch.ops.h3fusion
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, E, k): odd T, E not a multiple of 32, E = 1, k = E, E above 512, k above 32.
ROUTE_SHAPES = [(37, 8, 2), (5, 130, 7), (16, 1, 1), (9, 6, 6), (64, 512, 8), (3, 600, 40), (0, 8, 2)]


def _has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"h3fusion::{op}", "CPU")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _close(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[ours.dtype]
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _random_experts(T: int, k: int, num_experts: int, used: int | None = None) -> torch.Tensor:
    """[T, k] int32 ids drawn from [0, used) (default all experts); repeats within a token are allowed."""
    return torch.randint(0, used or num_experts, (T, k), device=DEV, dtype=torch.int32)


# ---- topk_route -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T,E,k", ROUTE_SHAPES)
def test_topk_route_forward(T, E, k, dtype, renormalize):
    logits = (torch.randn(T, E, device=DEV) * 3).to(dtype)
    w, e = ops.topk_route(logits, k, renormalize)
    rw, re = ref.topk_route(logits, k, renormalize)
    assert w.dtype == _acc(dtype) and e.dtype == torch.int32 and w.shape == e.shape == (T, k)
    assert torch.equal(e, re)
    _close(w, rw, "weights vs reference")
    if T and renormalize:
        _close(w.sum(-1), torch.ones(T, device=DEV, dtype=w.dtype), "renormalised sums")
    if _has_cpu_kernel("topk_route"):
        cw, ce = ops.topk_route(logits.cpu(), k, renormalize)
        assert torch.equal(e.cpu(), ce)
        _close(w.cpu(), cw, "weights vs CPU op")


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_route_ties_go_to_lower_index(dtype):
    # Integer logits: many exact ties, which must go to the lower expert id, in the reference's order.
    T, E = 50, 70
    logits = torch.randint(-2, 3, (T, E), device=DEV).to(dtype)
    for k in (1, 5, E):
        w, e = ops.topk_route(logits, k, True)
        rw, re = ref.topk_route(logits, k, True)
        assert torch.equal(e, re)
        _close(w, rw, f"weights k={k}")


def test_topk_route_underflow_and_k_equals_e():
    # Probabilities that underflow to exactly 0 tie too; with k = E every expert appears once.
    T, E = 7, 40
    logits = torch.randn(T, E, device=DEV)
    logits[:, 10:20] -= 300.0  # exp underflows to 0 in fp32
    logits[:, 3] -= 100.0  # denormal probability
    w, e = ops.topk_route(logits, E, False)
    rw, re = ref.topk_route(logits, E, False)
    assert torch.equal(e, re)
    assert torch.equal(e.sort(-1).values, torch.arange(E, device=DEV, dtype=torch.int32).expand(T, E))
    _close(w, rw, "weights")


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T,E,k", ROUTE_SHAPES)
def test_topk_route_backward(T, E, k, dtype, renormalize):
    from conftest import assert_close_to_reference

    logits = (torch.randn(T, E, device=DEV) * 2).to(dtype)
    _, experts = ops.topk_route(logits, k, renormalize)
    g = torch.randn(T, k, device=DEV, dtype=_acc(dtype))
    ours = ops.topk_route_backward(g, logits, experts, renormalize)
    assert ours.dtype == dtype and ours.shape == (T, E)

    def autograd_grad(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_()
        rw, re = ref.topk_route(z, k, renormalize)
        assert torch.equal(re, experts)
        (rw * g.to(rw.dtype)).sum().backward()
        return z.grad

    ref_fp = autograd_grad(logits.double())
    ref_lowp = autograd_grad(logits)
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close_to_reference(ours, ref_lowp, ref_fp, factor=3, atol=atol, what="grad_logits")
    if renormalize and T:  # experts that were not kept get exactly zero
        kept = torch.zeros(T, E, dtype=torch.bool, device=DEV).scatter_(1, experts.long(), True)
        assert torch.all(ours[~kept] == 0)
    if _has_cpu_kernel("topk_route_backward"):
        cpu = ops.topk_route_backward(g.cpu(), logits.cpu(), experts.cpu(), renormalize)
        torch.testing.assert_close(ours.cpu().double(), cpu.double(), rtol=1e-2, atol=1e-3)


def test_topk_route_bad_arguments():
    logits = torch.randn(4, 6, device=DEV)
    with pytest.raises(RuntimeError, match="k"):
        ops.topk_route(logits, 0, True)
    with pytest.raises(RuntimeError, match="k"):
        ops.topk_route(logits, 7, True)
    with pytest.raises(RuntimeError, match="logits"):
        ops.topk_route(logits[0], 2, True)
    with pytest.raises(RuntimeError, match="logits"):
        ops.topk_route(logits.to(torch.int32), 2, True)
    _, experts = ops.topk_route(logits, 2, True)
    with pytest.raises(RuntimeError, match="grad_weights"):
        ops.topk_route_backward(torch.randn(4, 3, device=DEV), logits, experts, True)
    with pytest.raises(RuntimeError, match="experts"):
        ops.topk_route_backward(torch.randn(4, 2, device=DEV), logits, experts.long(), True)


# ---- moe_route_plan ---------------------------------------------------------------------------------------------

# (T, k, E, used): multi-chunk (> 256 pairs), > 256 chunks (multi-tile chunk scan), E + 1 > 256 (multi-tile offsets
# scan), empty experts (used < E), E = 1, k = E, one expert taking every pair, T = 0.
PLAN_CASES = [
    (37, 2, 8, None),
    (1000, 4, 16, 4),
    (20000, 4, 3, None),
    (300, 3, 513, None),
    (50, 1, 1, None),
    (40, 6, 6, None),
    (3000, 1, 9, 1),
    (0, 2, 5, None),
    (77, 3, 130, None),
]


@pytest.mark.parametrize("T,k,E,used", PLAN_CASES)
def test_route_plan_matches_reference(T, k, E, used):
    experts = _random_experts(T, k, E, used)
    sp, pr, off = ops.moe_route_plan(experts, E)
    rsp, rpr, roff = ref.moe_route_plan(experts, E)
    assert sp.dtype == pr.dtype == torch.int32 and off.dtype == torch.int64 and off.shape == (E + 1,)
    assert torch.equal(sp, rsp) and torch.equal(pr, rpr) and torch.equal(off, roff)
    n = T * k
    assert torch.equal(pr[sp.long()], torch.arange(n, device=DEV, dtype=torch.int32))  # inverse permutation
    if _has_cpu_kernel("moe_route_plan"):
        csp, cpr, coff = ops.moe_route_plan(experts.cpu(), E)
        assert torch.equal(sp.cpu(), csp) and torch.equal(pr.cpu(), cpr) and torch.equal(off.cpu(), coff)


def test_route_plan_from_topk():
    logits = torch.randn(333, 130, device=DEV)
    _, experts = ops.topk_route(logits, 8, True)
    got = ops.moe_route_plan(experts, 130)
    want = ref.moe_route_plan(experts, 130)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_route_plan_invalid_ids_stay_memory_safe():
    # Out-of-range ids are a caller bug that CUDA cannot report without a sync; they must still give permutations,
    # with the invalid pairs after every real expert (rows [offsets[E], N)) in ascending pair order.
    E = 5
    experts = torch.randint(-2, 8, (300, 2), device=DEV, dtype=torch.int32)
    sp, pr, off = ops.moe_route_plan(experts, E)
    flat = experts.reshape(-1)
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, E)
    assert torch.equal(sp.long(), torch.sort(key, stable=True).indices)
    assert torch.equal(pr[sp.long()], torch.arange(flat.numel(), device=DEV, dtype=torch.int32))
    counts = torch.stack([(key == e).sum() for e in range(E)])
    assert off[0] == 0 and torch.equal(off[1:], counts.cumsum(0))


def test_route_plan_bad_arguments():
    experts = _random_experts(4, 2, 3)
    with pytest.raises(RuntimeError, match="experts"):
        ops.moe_route_plan(experts.long(), 3)
    with pytest.raises(RuntimeError, match="experts"):
        ops.moe_route_plan(experts.reshape(-1), 3)
    with pytest.raises(RuntimeError, match="num_experts"):
        ops.moe_route_plan(experts, 0)


# ---- moe_gather / moe_combine -----------------------------------------------------------------------------------

# H values hit every copy width: 16-byte (64), 8 (fp32 H=2), 4 (fp16 H=6), 2 (odd bf16/fp16), and odd fp32.
GATHER_H = [64, 2, 6, 37, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", GATHER_H)
@pytest.mark.parametrize("T,k,E", [(29, 2, 5), (300, 3, 7), (0, 2, 4), (8, 4, 4)])
def test_gather_matches_reference(T, k, E, H, dtype):
    x = torch.randn(T, H, device=DEV).to(dtype)
    sp, _, _ = ops.moe_route_plan(_random_experts(T, k, E), E)
    out = ops.moe_gather(x, sp, k)
    assert out.shape == (T * k, H) and out.dtype == dtype
    assert torch.equal(out, ref.moe_gather(x, sp, k))
    if _has_cpu_kernel("moe_gather"):
        assert torch.equal(out.cpu(), ops.moe_gather(x.cpu(), sp.cpu(), k))


def test_gather_misaligned_and_noncontiguous():
    T, k, E, H = 21, 2, 3, 40
    base = torch.randn(T * H + 1, device=DEV, dtype=torch.bfloat16)
    x = base[1:].view(T, H)  # data pointer 2 bytes past a 16-byte boundary
    sp, _, _ = ops.moe_route_plan(_random_experts(T, k, E), E)
    assert torch.equal(ops.moe_gather(x, sp, k), ref.moe_gather(x, sp, k))
    xt = torch.randn(H, T, device=DEV).t()  # non-contiguous
    assert torch.equal(ops.moe_gather(xt, sp, k), ref.moe_gather(xt, sp, k))


@pytest.mark.parametrize("w_dtype", ["fp32", "same"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [64, 37, 1])
@pytest.mark.parametrize("T,k,E", [(29, 2, 5), (300, 3, 7), (0, 2, 4), (8, 4, 4), (5, 1, 1)])
def test_combine_matches_reference(T, k, E, H, dtype, w_dtype):
    from conftest import assert_close_to_reference

    rows = torch.randn(T * k, H, device=DEV).to(dtype)
    weights = torch.rand(T, k, device=DEV).to(torch.float32 if w_dtype == "fp32" else dtype)
    _, pr, _ = ops.moe_route_plan(_random_experts(T, k, E), E)
    y = ops.moe_combine(rows, weights, pr)
    assert y.shape == (T, H) and y.dtype == dtype
    if T == 0:  # reference.moe_combine cannot reshape 0 rows to [0, k, -1]
        return
    ref_fp = ref.moe_combine(rows.double(), weights.double(), pr)
    assert_close_to_reference(y, ref.moe_combine(rows, weights, pr), ref_fp, factor=2, what="combine")
    if _has_cpu_kernel("moe_combine"):
        cpu = ops.moe_combine(rows.cpu(), weights.cpu(), pr.cpu())
        tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(y.cpu().double(), cpu.double(), rtol=tol, atol=tol)


def test_gather_combine_bad_arguments():
    x = torch.randn(6, 4, device=DEV)
    sp, pr, _ = ops.moe_route_plan(_random_experts(6, 2, 3), 3)
    with pytest.raises(RuntimeError, match="sorted_pairs"):
        ops.moe_gather(x, sp[:-1], 2)
    with pytest.raises(RuntimeError, match="sorted_pairs"):
        ops.moe_gather(x, sp.long(), 2)
    with pytest.raises(RuntimeError, match="k"):
        ops.moe_gather(x, sp, 0)
    rows = torch.randn(12, 4, device=DEV)
    w = torch.rand(6, 2, device=DEV)
    with pytest.raises(RuntimeError, match="pair_rows"):
        ops.moe_combine(rows, w, pr.long())
    with pytest.raises(RuntimeError, match="rows"):
        ops.moe_combine(rows[:-1], w, pr)
    with pytest.raises(RuntimeError, match="weights"):
        ops.moe_combine(rows, w.cpu(), pr)


# ---- determinism, no host sync, CUDA graphs, opcheck ------------------------------------------------------------


def _pipeline(logits: torch.Tensor, x: torch.Tensor, k: int, g: torch.Tensor):
    """Every op of this file once; returns all outputs."""
    E = logits.shape[1]
    w, e = ops.topk_route(logits, k, True)
    sp, pr, off = ops.moe_route_plan(e, E)
    xs = ops.moe_gather(x, sp, k)
    y = ops.moe_combine(xs, w, pr)
    gl = ops.topk_route_backward(g, logits, e, True)
    return w, e, sp, pr, off, xs, y, gl


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic(dtype):
    T, E, k, H = 700, 130, 6, 72
    logits = torch.randn(T, E, device=DEV).to(dtype)
    x = torch.randn(T, H, device=DEV).to(dtype)
    g = torch.randn(T, k, device=DEV)
    first = _pipeline(logits, x, k, g)
    second = _pipeline(logits, x, k, g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_host_sync():
    T, E, k, H = 100, 9, 3, 40
    logits = torch.randn(T, E, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(T, k, device=DEV)
    empty = torch.empty(0, E, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _pipeline(logits, x, k, g)
        _pipeline(empty, torch.empty(0, H, device=DEV), k, torch.empty(0, k, device=DEV))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay():
    T, E, k, H = 257, 12, 2, 24
    logits = torch.randn(T, E, device=DEV)
    x = torch.randn(T, H, device=DEV)
    g = torch.randn(T, k, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs recommends
        _pipeline(logits, x, k, g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _pipeline(logits, x, k, g)
    for _ in range(2):  # new inputs into the static tensors, replay, compare with eager
        logits.copy_(torch.randn(T, E, device=DEV))
        x.copy_(torch.randn(T, H, device=DEV))
        graph.replay()
        torch.cuda.synchronize()
        eager = _pipeline(logits, x, k, g)
        for a, b in zip(captured, eager, strict=True):
            assert torch.equal(a, b)


def test_opcheck_schema():
    T, E, k, H = 17, 6, 2, 8
    logits = torch.randn(T, E, device=DEV)
    w, e = ops.topk_route(logits, k, True)
    sp, pr, _ = ops.moe_route_plan(e, E)
    x = torch.randn(T, H, device=DEV)
    cases = [
        (ops.topk_route.default, (logits, k, True)),
        (ops.topk_route_backward.default, (torch.randn(T, k, device=DEV), logits, e, False)),
        (ops.moe_route_plan.default, (e, E)),
        (ops.moe_gather.default, (x, sp, k)),
        (ops.moe_combine.default, (torch.randn(T * k, H, device=DEV), w, pr)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema",))


def test_fuzz_against_reference():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=20, deadline=None)
    @hypothesis.given(
        T=st.integers(0, 80),
        E=st.integers(1, 140),
        k_frac=st.floats(0.0, 1.0),
        H=st.integers(1, 50),
        dtype=st.sampled_from(DTYPES),
        renormalize=st.booleans(),
    )
    def check(T, E, k_frac, H, dtype, renormalize):
        k = max(1, min(E, 1 + int(k_frac * min(E, 12))))
        logits = (torch.randn(T, E, device=DEV) * 2).to(dtype)
        w, e = ops.topk_route(logits, k, renormalize)
        rw, re = ref.topk_route(logits, k, renormalize)
        assert torch.equal(e, re)
        _close(w, rw, "weights")
        plan = ops.moe_route_plan(e, E)
        assert all(torch.equal(a, b) for a, b in zip(plan, ref.moe_route_plan(e, E), strict=True))
        x = torch.randn(T, H, device=DEV).to(dtype)
        xs = ops.moe_gather(x, plan[0], k)
        assert torch.equal(xs, ref.moe_gather(x, plan[0], k))
        y = ops.moe_combine(xs, w, plan[1])
        assert y.shape == (T, H) and y.dtype == dtype
        if T:  # reference.moe_combine cannot reshape 0 rows
            want = ref.moe_combine(xs.double(), w.double(), plan[1])
            torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)

    check()
