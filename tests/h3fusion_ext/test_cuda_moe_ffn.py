"""CUDA moe_ffn_forward / moe_ffn_backward against the reference oracle and the CPU op, for both GEMM backends:
"own" (csrc/cuda/grouped_gemm_*.cu) and "torch" (at::_grouped_mm, csrc/cuda/moe_ffn_torch_gemm.cu). Values and
gradients in fp32/bf16/fp16 (flash-attention tolerance rule), edge cases, determinism, no host synchronisation,
CUDA-graph capture, the backend choice ("auto" mode, refusals of "torch"), and a hypothesis shape fuzz.
Every test needs a GPU (marker `cuda`).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_close_to_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import h3fusion_ext
from h3fusion_ext import reference

pytestmark = pytest.mark.cuda
ops = torch.ops.h3fusion
GRAD_NAMES = ("x", "weights", "gate_up_proj", "down_proj")
LOWP = [torch.bfloat16, torch.float16]
BACKENDS = ("own", "torch")
REFUSAL = 'grouped-GEMM backend is "torch"'
TORCH_2_9 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 9)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test under one GEMM backend mode ("own" or "torch"), restoring the mode afterwards."""
    with h3fusion_ext.moe_ffn_gemm_mode(request.param):
        yield request.param


def grouped_mm_fast(dtype) -> bool:
    """Whether torch._grouped_mm has its device-side (CUTLASS, no host sync) path for `dtype` on this GPU."""
    major = torch.cuda.get_device_capability()[0]
    return hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16 and (major == 9 or (TORCH_2_9 and major == 10))


def torch_mode_takes(dtype, H, F, E) -> bool:
    """The documented contract of the "torch" mode (csrc/cuda/moe_gemm_backend.h): what at::_grouped_mm accepts."""
    if not hasattr(torch, "_grouped_mm") or not (grouped_mm_fast(dtype) or TORCH_2_9):
        return False
    elem = torch.finfo(dtype).bits // 8
    return H > 0 and F > 0 and (H * elem) % 16 == 0 and (F * elem) % 16 == 0 and E < 1024


def expected_backend(mode, dtype, H, F, E) -> str:
    if mode == "own":
        return "own"
    if mode == "torch":
        return "torch"
    return "torch" if grouped_mm_fast(dtype) and torch_mode_takes(dtype, H, F, E) else "own"


def current_mode() -> str:
    return ops.moe_ffn_set_gemm_backend(None)


def skip_unless_taken(inputs):
    """In "torch" mode, a call at::_grouped_mm cannot take must raise (checked here), and the test is skipped."""
    x, _, _, gu, dp = inputs
    if current_mode() == "torch" and not torch_mode_takes(x.dtype, x.shape[1], dp.shape[2], gu.shape[0]):
        with pytest.raises(RuntimeError, match=REFUSAL):
            ops.moe_ffn_forward(*inputs)
        pytest.skip(f"torch._grouped_mm cannot take {x.dtype} H={x.shape[1]} F={dp.shape[2]} (refusal checked)")


def make_inputs(T, H, F, E, k, dtype, w_dtype=torch.float32, skip_experts=(), gen=None):
    """Random CUDA inputs: routing from real logits (k distinct experts per token), experts in `skip_experts` get
    no tokens. Returns x[T,H], weights[T,k] (w_dtype), experts[T,k] int32, gate_up[E,2F,H], down[E,H,F]."""
    logits = torch.randn(T, E, generator=gen)
    if skip_experts:
        logits[:, list(skip_experts)] = -1e4
    weights, experts = reference.topk_route(logits, k)
    x = torch.randn(T, H, generator=gen)
    gate_up = torch.randn(E, 2 * F, H, generator=gen) / H**0.5
    down = torch.randn(E, H, F, generator=gen) / F**0.5
    dev = "cuda"
    return (
        x.to(dev, dtype),
        weights.to(dev, w_dtype),
        experts.to(dev, torch.int32),
        gate_up.to(dev, dtype),
        down.to(dev, dtype),
    )


def ours(inputs, grad_y):
    """The CUDA ops called directly, under the current backend mode: (y, plan + h, grads in GRAD_NAMES order).

    Checks that the backend the mode promises is the one that ran (skips, after checking the refusal, a call the
    "torch" mode cannot take)."""
    skip_unless_taken(inputs)
    x, w, e, gu, dp = inputs
    fwd = ops.moe_ffn_forward(x, w, e, gu, dp)
    want = expected_backend(current_mode(), x.dtype, x.shape[1], dp.shape[2], gu.shape[0])
    assert h3fusion_ext.moe_ffn_backend() == want, "forward"
    grads = ops.moe_ffn_backward(grad_y, x, w, gu, dp, *fwd[1:])
    assert h3fusion_ext.moe_ffn_backend() == want, "backward"
    return fwd[0], fwd[1:], list(grads)


def reference_with_grads(inputs, grad_y, dtype=None):
    """The reference per-expert loop (optionally upcast to `dtype`) and its autograd gradients."""
    x, w, e, gu, dp = (t.detach().clone() for t in inputs)
    if dtype is not None:
        x, w, gu, dp, grad_y = (t.to(dtype) for t in (x, w, gu, dp, grad_y))
    leaves = [t.requires_grad_() for t in (x, w, gu, dp)]
    y = reference.moe_ffn(x, w, e, gu, dp)
    if not y.requires_grad:  # T = 0: the reference returns a constant
        return y.detach(), [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(y, leaves, grad_y)
    return y.detach(), list(grads)


def check_vs_reference(inputs, grad_y):
    """Our values within 2x (gradients 3x) of PyTorch's own same-dtype error against an fp64 reference."""
    dtype = inputs[0].dtype
    y, plan, grads = ours(inputs, grad_y)
    ref_y, ref_grads = reference_with_grads(inputs, grad_y)
    hi_y, hi_grads = reference_with_grads(inputs, grad_y, torch.float64)
    atol = 2e-5 if dtype == torch.float32 else 1e-5
    assert y.dtype == dtype and y.shape == inputs[0].shape
    assert_close_to_reference(y, ref_y, hi_y, factor=2.0, atol=atol, what="y")
    for name, g, g_lp, g_hp, t in zip(GRAD_NAMES, grads, ref_grads, hi_grads, inputs[:2] + inputs[3:], strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape and g.device == t.device, name
        assert_close_to_reference(g, g_lp, g_hp, factor=3.0, atol=atol, what=f"grad {name}")
    # the plan is exactly the reference's, and h is the pre-activation of the sorted rows
    for got, want in zip(plan[:3], reference.moe_route_plan(inputs[2], inputs[3].shape[0]), strict=True):
        assert torch.equal(got, want)
    return y, plan, grads


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("T,H,F,E,k", [(64, 64, 64, 4, 2), (150, 72, 40, 6, 2), (37, 136, 200, 8, 3)])
def test_forward_backward_match_reference(dtype, T, H, F, E, k, backend):
    inputs = make_inputs(T, H, F, E, k, dtype)
    check_vs_reference(inputs, torch.randn_like(inputs[0]))


@pytest.mark.parametrize("dtype", LOWP)
def test_weights_in_activation_dtype(dtype, backend):
    inputs = make_inputs(80, 48, 56, 5, 2, dtype, w_dtype=dtype)
    _, _, grads = check_vs_reference(inputs, torch.randn_like(inputs[0]))
    assert grads[1].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_gate_up_out_is_the_sorted_preactivation(dtype, backend):
    x, w, e, gu, dp = inputs = make_inputs(90, 40, 24, 4, 2, dtype)
    skip_unless_taken(inputs)
    _, sorted_pairs, _, offsets, h = ops.moe_ffn_forward(x, w, e, gu, dp)
    assert h3fusion_ext.moe_ffn_backend() == expected_backend(backend, dtype, 40, 24, 4)
    k = e.shape[1]
    tok = sorted_pairs.long() // k
    expert_of_row = e.reshape(-1).long()[sorted_pairs.long()]
    want_hi = torch.einsum("rh,rnh->rn", x[tok].double(), gu[expert_of_row].double())
    want_lp = torch.einsum("rh,rnh->rn", x[tok].float(), gu[expert_of_row].float()).to(dtype)
    assert h.shape == (90 * k, 2 * 24) and h.dtype == dtype
    assert_close_to_reference(h, want_lp, want_hi, factor=2.0, atol=1e-5, what="gate_up_out")
    counts = torch.bincount(e.reshape(-1).long(), minlength=4)
    assert torch.equal(offsets[1:] - offsets[:-1], counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cpu_op(dtype, backend):
    inputs = make_inputs(70, 40, 24, 5, 2, dtype)
    grad_y = torch.randn_like(inputs[0])
    y, plan, grads = ours(inputs, grad_y)
    x_c, w_c, e_c, gu_c, dp_c = (t.cpu() for t in inputs)
    fwd_c = ops.moe_ffn_forward(x_c, w_c, e_c, gu_c, dp_c)
    y_c, plan_c = fwd_c[0], fwd_c[1:]
    grads_c = ops.moe_ffn_backward(grad_y.cpu(), x_c, w_c, gu_c, dp_c, *plan_c)
    for a, b in zip(plan[:3], plan_c[:3], strict=True):
        assert torch.equal(a.cpu(), b)
    if dtype == torch.float32:
        tol = dict(atol=2e-5, rtol=2e-4)
    else:  # both sides round h, act and the expert outputs (the torch backend U too) to bf16: a few bf16 ulps
        tol = dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y.cpu(), y_c, **tol)
    torch.testing.assert_close(plan[3].cpu(), plan_c[3], **tol)
    for name, g, g_c in zip(GRAD_NAMES, grads, grads_c, strict=True):
        torch.testing.assert_close(g.cpu(), g_c, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_autograd_api(dtype, backend):
    inputs = make_inputs(60, 32, 48, 4, 2, dtype)
    skip_unless_taken(inputs)
    grad_y = torch.randn_like(inputs[0])
    x, w, e, gu, dp = (t.detach().clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (x, w, gu, dp)]
    y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
    grads = torch.autograd.grad(y, leaves, grad_y)
    assert h3fusion_ext.moe_ffn_backend() == expected_backend(backend, dtype, 32, 48, 4)
    ref_y, ref_grads = reference_with_grads(inputs, grad_y)
    hi_y, hi_grads = reference_with_grads(inputs, grad_y, torch.float64)
    assert_close_to_reference(y, ref_y, hi_y, factor=2.0, atol=2e-5, what="y")
    for name, g, g_lp, g_hp in zip(GRAD_NAMES, grads, ref_grads, hi_grads, strict=True):
        assert_close_to_reference(g, g_lp, g_hp, factor=3.0, atol=2e-5, what=f"grad {name}")


@pytest.mark.parametrize(
    "name,shape,skip",
    [
        ("empty experts", (50, 40, 24, 6, 2), (1, 4)),
        ("k=E", (33, 24, 40, 3, 3), ()),
        ("E=1", (45, 72, 40, 1, 1), ()),
        ("H,F not multiples of 16", (29, 72, 40, 4, 2), ()),
        ("tiny H,F", (17, 5, 3, 3, 2), ()),
        ("odd H,F", (21, 33, 17, 4, 2), ()),
        ("H,F multiples of 8 only", (25, 40, 24, 5, 2), (0,)),
        ("T=1", (1, 24, 16, 4, 2), ()),
        ("many tiles per expert", (400, 24, 16, 2, 1), ()),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_cases(name, shape, skip, dtype, backend):
    inputs = make_inputs(*shape, dtype, skip_experts=skip)
    _, plan, grads = check_vs_reference(inputs, torch.randn_like(inputs[0]))
    for e in skip:  # experts without tokens: no rows, exactly zero weight gradients
        assert plan[2][e] == plan[2][e + 1]
        assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k", [(3, 2), (2, 4)])
def test_repeated_experts_per_token(dtype, E, k, backend):
    # ids drawn with replacement (k > E forces repeats): every (token, slot) pair is its own row
    x, w, _, gu, dp = make_inputs(40, 24, 40, E, 1, dtype)
    e = torch.randint(0, E, (40, k), device="cuda", dtype=torch.int32)
    w = torch.rand(40, k, device="cuda")
    check_vs_reference((x, w, e, gu, dp), torch.randn_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("api", ["ops", "autograd"])
def test_unrouted_pairs_contribute_zero(dtype, api, backend):
    # Expert ids outside [0, E) cannot raise on CUDA without a host sync (the CPU op raises). The contract: such a
    # pair contributes exactly zero to y and gets zero gradient, as reference.moe_ffn (which skips it) computes.
    T, H, F, E, k = 2048, 160, 80, 5, 2  # every row buffer > 1 MB, so it comes from the poisoned large pool
    x, w, e, gu, dp = make_inputs(T, H, F, E, k, dtype)
    # poison the caching allocator: rows that no kernel writes would then hold NaN rather than stale zeros
    torch.full((16 << 20,), float("nan"), device="cuda").view(-1)
    bad = torch.rand(T, k, device="cuda") < 0.3
    bad[0] = True  # one token with no valid pair at all
    bad_ids = torch.tensor([-1, E, 2**31 - 1, -(2**31)], device="cuda", dtype=torch.int32)
    e = torch.where(bad, bad_ids[torch.randint(0, 4, (T, k), device="cuda")], e)
    inputs = (x, w, e, gu, dp)
    skip_unless_taken(inputs)
    grad_y = torch.randn_like(x)
    if api == "ops":
        y, plan, grads = ours(inputs, grad_y)
        assert plan[2][E] == (~bad).sum()  # offsets[E] counts the valid pairs; the unrouted ones come after
    else:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, gu, dp)]
        y = h3fusion_ext.moe_ffn(leaves[0], leaves[1], e, leaves[2], leaves[3])
        grads = list(torch.autograd.grad(y, leaves, grad_y))
    ref_y, ref_grads = reference_with_grads(inputs, grad_y)
    hi_y, hi_grads = reference_with_grads(inputs, grad_y, torch.float64)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert y[0].abs().max() == 0 and grads[0][0].abs().max() == 0  # token 0: every pair unrouted
    assert (grads[1][bad] == 0).all()
    atol = 2e-5 if dtype == torch.float32 else 1e-5
    assert_close_to_reference(y, ref_y, hi_y, factor=2.0, atol=atol, what="y")
    for name, g, g_lp, g_hp in zip(GRAD_NAMES, grads, ref_grads, hi_grads, strict=True):
        assert_close_to_reference(g, g_lp, g_hp, factor=3.0, atol=atol, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens(dtype, backend):
    T, H, F, E, k = 0, 24, 16, 4, 2
    x, w, e, gu, dp = inputs = make_inputs(T, H, F, E, k, dtype)
    skip_unless_taken(inputs)
    y, sorted_pairs, pair_rows, offsets, h = ops.moe_ffn_forward(x, w, e, gu, dp)
    assert h3fusion_ext.moe_ffn_backend() == expected_backend(backend, dtype, H, F, E)
    assert y.shape == (0, H) and sorted_pairs.shape == (0,) and pair_rows.shape == (0,) and h.shape == (0, 2 * F)
    assert torch.equal(offsets, torch.zeros(E + 1, dtype=torch.int64, device="cuda"))
    gx, gw, ggu, gdp = ops.moe_ffn_backward(
        torch.empty(0, H, device="cuda", dtype=dtype), x, w, gu, dp, sorted_pairs, pair_rows, offsets, h
    )
    assert gx.shape == (0, H) and gw.shape == (0, k) and gw.dtype == w.dtype
    assert ggu.shape == gu.shape and gdp.shape == dp.shape
    assert ggu.abs().max() == 0 and gdp.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_deterministic(dtype, backend):
    # several 64-row tiles per expert and several expert blocks per output tile, so any order dependence shows
    inputs = make_inputs(300, 136, 200, 4, 2, dtype)
    grad_y = torch.randn_like(inputs[0])
    y1, p1, g1 = ours(inputs, grad_y)
    y2, p2, g2 = ours(inputs, grad_y)
    for a, b in zip([y1, *p1, *g1], [y2, *p2, *g2], strict=True):
        assert torch.equal(a, b)


def skip_unless_device_side(backend, dtype):
    if backend == "torch" and not grouped_mm_fast(dtype):
        pytest.skip(f"torch._grouped_mm synchronises with the host for {dtype} on this GPU/torch (its fallback loop)")


def test_no_host_sync(backend):
    skip_unless_device_side(backend, torch.bfloat16)
    inputs = make_inputs(64, 40, 24, 5, 2, torch.bfloat16)
    grad_y = torch.randn_like(inputs[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, plan, grads = ours(inputs, grad_y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(y.float()).all()


def test_public_api_no_host_sync(backend):
    skip_unless_device_side(backend, torch.bfloat16)
    x, w, e, gu, dp = make_inputs(64, 40, 24, 5, 2, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, w, gu, dp)]
    grad_y = torch.randn_like(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
        grads = torch.autograd.grad(y, leaves, grad_y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype, backend):
    skip_unless_device_side(backend, dtype)
    T, H, F, E, k = 96, 40, 56, 6, 2
    static = [t.clone() for t in make_inputs(T, H, F, E, k, dtype)]
    static_gy = torch.randn(T, H, device="cuda", dtype=dtype)

    def step():
        y, plan, grads = ours(static, static_gy)
        return [y, *plan, *grads]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    # new values, including a new routing (different group sizes, one expert now empty): replay must follow them
    fresh = make_inputs(T, H, F, E, k, dtype, skip_experts=(2,))
    for dst, src in zip(static, fresh, strict=True):
        dst.copy_(src)
    static_gy.copy_(torch.randn_like(static_gy))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured, eager, strict=True):
        assert torch.equal(a, b)
    check_vs_reference([t.clone() for t in static], static_gy.clone())


def test_bad_inputs_name_the_argument():
    x, w, e, gu, dp = make_inputs(8, 16, 8, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="float64"):
        ops.moe_ffn_forward(x.double(), w.double(), e, gu.double(), dp.double())
    with pytest.raises(RuntimeError, match="down_proj"):
        ops.moe_ffn_forward(x, w, e, gu, dp[:, :, :-1])
    with pytest.raises(RuntimeError, match="gate_up_proj"):
        ops.moe_ffn_forward(x, w, e, gu.bfloat16(), dp)
    with pytest.raises(RuntimeError, match="experts"):
        ops.moe_ffn_forward(x, w, e.long(), gu, dp)
    y, *plan = ops.moe_ffn_forward(x, w, e, gu, dp)
    with pytest.raises(RuntimeError, match="grad_y"):
        ops.moe_ffn_backward(y[:, :-1], x, w, gu, dp, *plan)
    with pytest.raises(RuntimeError, match="expert_offsets"):
        ops.moe_ffn_backward(y, x, w, gu, dp, plan[0], plan[1], plan[2][:-1], plan[3])


# ---- the backend choice -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,H,F", [(torch.bfloat16, 64, 48), (torch.float16, 64, 48), (torch.float32, 64, 48), (torch.bfloat16, 33, 17)]
)
def test_auto_mode_runs_torch_only_where_device_side(dtype, H, F):
    inputs = make_inputs(40, H, F, 4, 2, dtype)
    with h3fusion_ext.moe_ffn_gemm_mode("auto"):
        assert current_mode() == "auto"
        check_vs_reference(inputs, torch.randn_like(inputs[0]))  # ours() checks the backend that ran
    want = "torch" if grouped_mm_fast(dtype) and H % 8 == 0 and F % 8 == 0 else "own"
    assert h3fusion_ext.moe_ffn_backend() == want


def test_torch_mode_refuses_what_grouped_mm_cannot_take():
    if not torch_mode_takes(torch.bfloat16, 16, 8, 2):
        pytest.skip("torch._grouped_mm takes no bfloat16 call on this GPU/torch (test_fuzz_shapes checks that)")
    with h3fusion_ext.moe_ffn_gemm_mode("torch"):
        odd = make_inputs(9, 33, 17, 3, 2, torch.bfloat16)  # 66- and 34-byte rows: not 16-byte strides
        with pytest.raises(RuntimeError, match=r"(?s)grouped-GEMM backend is \"torch\".*H=33, F=17"):
            ops.moe_ffn_forward(*odd)
        many = make_inputs(4, 16, 8, 1024, 1, torch.bfloat16)  # the CUTLASS grouped GEMM takes < 1024 groups
        with pytest.raises(RuntimeError, match="at most 1023 experts"):
            ops.moe_ffn_forward(*many)
        x, w, e, gu, dp = make_inputs(8, 16, 8, 2, 1, torch.bfloat16)
        storage = torch.empty(gu.numel() + 1, device="cuda", dtype=gu.dtype)
        shifted = storage[1:].view_as(gu).copy_(gu)  # contiguous but 2 bytes off a 16-byte boundary
        with pytest.raises(RuntimeError, match="16-byte aligned"):
            ops.moe_ffn_forward(x, w, e, shifted, dp)
    with h3fusion_ext.moe_ffn_gemm_mode("auto"):  # the same odd call runs on our kernels
        y = ops.moe_ffn_forward(*odd)[0]
        assert h3fusion_ext.moe_ffn_backend() == "own" and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backends_agree(dtype):
    """The torch backend against our own kernels (the oracle): the same plan exactly, values to a few ulps."""
    if not torch_mode_takes(dtype, 64, 48, 6):
        pytest.skip(f"torch._grouped_mm takes no {dtype} call on this GPU/torch")
    inputs = make_inputs(130, 64, 48, 6, 2, dtype, skip_experts=(3,))
    grad_y = torch.randn_like(inputs[0])
    results = {}
    for mode in BACKENDS:
        with h3fusion_ext.moe_ffn_gemm_mode(mode):
            results[mode] = ours(inputs, grad_y)
    (y_o, plan_o, grads_o), (y_t, plan_t, grads_t) = results["own"], results["torch"]
    for a, b in zip(plan_o[:3], plan_t[:3], strict=True):
        assert torch.equal(a, b)
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y_t, y_o, **tol)
    torch.testing.assert_close(plan_t[3], plan_o[3], **tol)
    for name, g_t, g_o in zip(GRAD_NAMES, grads_t, grads_o, strict=True):
        torch.testing.assert_close(g_t, g_o, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    assert grads_t[2][3].abs().max() == 0 and grads_t[3][3].abs().max() == 0  # the empty expert


def test_backward_output_mask_skips_only_unneeded(backend):
    """Once moe_ffn_backward takes output_mask, every needed gradient is bitwise the full backward's."""
    if "output_mask" not in str(ops.moe_ffn_backward.default._schema):
        pytest.skip("moe_ffn_backward has no output_mask argument in this build")
    x, w, e, gu, dp = inputs = make_inputs(70, 40, 24, 5, 2, torch.bfloat16, skip_experts=(1,))
    skip_unless_taken(inputs)
    grad_y = torch.randn_like(x)
    plan = ops.moe_ffn_forward(*inputs)[1:]
    full = ops.moe_ffn_backward(grad_y, x, w, gu, dp, *plan, output_mask=[True] * 4)
    for mask in itertools.product([False, True], repeat=4):
        got = ops.moe_ffn_backward(grad_y, x, w, gu, dp, *plan, output_mask=list(mask))
        for name, needed, g, f in zip(GRAD_NAMES, mask, got, full, strict=True):
            if needed:
                assert g is not None and torch.equal(g, f), f"grad {name} with output_mask={mask}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    T=st.integers(0, 70),
    H=st.integers(1, 90),
    F=st.integers(1, 80),
    E=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes(T, H, F, E, k_frac, dtype, seed, backend):
    k = 1 + int(k_frac * (E - 1))
    gen = torch.Generator().manual_seed(seed)
    if backend == "torch":  # mostly shapes at::_grouped_mm takes (16-byte rows); the others must be refused
        H, F = (H + 7) // 8 * 8 if seed % 4 else H, (F + 7) // 8 * 8 if seed % 4 else F
    inputs = make_inputs(T, H, F, E, k, dtype, gen=gen)
    if backend == "torch" and not torch_mode_takes(dtype, H, F, E):
        with pytest.raises(RuntimeError, match=REFUSAL):
            ops.moe_ffn_forward(*inputs)
        return
    check_vs_reference(inputs, torch.randn(T, H, generator=gen).to("cuda", dtype))
