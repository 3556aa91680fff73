"""Ops never answer wrongly in silence (issue 8): double backward raises, index contracts are checked on the CPU,
mixed devices (meta included) raise, integer arguments are integers, and unrouted pairs have a defined result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import h3fusion_ext
from h3fusion_ext import reference

ops = torch.ops.h3fusion
T, H, F, E, K, V = 6, 8, 5, 4, 2, 11


def ffn_inputs(dtype=torch.float64, grad=True):
    weights, experts = reference.topk_route(torch.randn(T, E, dtype=dtype), K)
    x = torch.randn(T, H, dtype=dtype)
    gate_up = torch.randn(E, 2 * F, H, dtype=dtype) / H**0.5
    down = torch.randn(E, H, F, dtype=dtype) / F**0.5
    x, weights, gate_up, down = (t.requires_grad_(grad) for t in (x, weights.to(dtype), gate_up, down))
    return x, weights, experts, gate_up, down


def logprob_inputs(dtype=torch.float64):
    hidden = torch.randn(T, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    return hidden, weight, torch.randint(0, V, (T,))


# ---- double backward (item 3) --------------------------------------------------------------------------------


def _ffn_case():
    x, w, e, gu, dp = ffn_inputs()
    return "moe_ffn", h3fusion_ext.moe_ffn(x, w, e, gu, dp), (x, w, gu, dp)


def _topk_case():
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    weights, _ = h3fusion_ext.topk_route(logits, K)
    return "topk_route", weights, (logits,)


def _logprob_case():
    hidden, weight, targets = logprob_inputs()
    return "linear_logprob", h3fusion_ext.linear_logprob(hidden, weight, targets), (hidden, weight)


def _gather_case():
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    sp, _, _ = h3fusion_ext.moe_route_plan(torch.randint(0, E, (T, K), dtype=torch.int32), E)
    return "moe_gather", h3fusion_ext.moe_gather(x, sp, K), (x,)


def _combine_case():
    rows = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    return "moe_combine", h3fusion_ext.moe_combine(rows, w, torch.randperm(T * K).to(torch.int32)), (rows, w)


DOUBLE_BACKWARD_CASES = [_ffn_case, _topk_case, _logprob_case, _gather_case, _combine_case]


@pytest.mark.parametrize("case", DOUBLE_BACKWARD_CASES, ids=lambda c: c.__name__[1:-5])
def test_double_backward_raises_naming_the_op(case):
    op, out, inputs = case()
    # a nonlinear loss, so the true second derivative is non-zero through every input
    grads = torch.autograd.grad((out**2).sum(), inputs, create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    with pytest.raises(RuntimeError, match=rf"double backward is not supported by h3fusion_ext\.{op}\b"):
        torch.autograd.grad(penalty, inputs, retain_graph=True)
    with pytest.raises(RuntimeError, match=rf"double backward is not supported by h3fusion_ext\.{op}\b"):
        penalty.backward()


@pytest.mark.parametrize("case", DOUBLE_BACKWARD_CASES, ids=lambda c: c.__name__[1:-5])
def test_create_graph_keeps_first_order_values(case):
    torch.manual_seed(1234)
    _, out, inputs = case()
    plain = torch.autograd.grad((out**2).sum(), inputs, retain_graph=True)
    graphed = torch.autograd.grad((out**2).sum(), inputs, create_graph=True)
    for a, b in zip(plain, graphed, strict=True):
        assert b.requires_grad
        assert torch.equal(a, b.detach())


def test_double_backward_raises_when_only_a_weight_requires_grad():
    # The incoming gradient does not require grad here; the saved gate_up_proj does, and d(grad_down)/d(gate_up)
    # is not zero, so the second derivative must raise rather than come back silently as zero.
    x, w, e, gu, dp = ffn_inputs(grad=False)
    gu.requires_grad_()
    dp.requires_grad_()
    y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
    (g_down,) = torch.autograd.grad(y.sum(), dp, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward is not supported by h3fusion_ext\.moe_ffn"):
        torch.autograd.grad(g_down.sum(), gu)


def test_reference_supports_double_backward():
    # the message points to the reference for higher-order gradients; it must actually provide them
    x, w, e, gu, dp = ffn_inputs()
    y = reference.moe_ffn(x, w, e, gu, dp)
    (gx,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    (gxx,) = torch.autograd.grad((gx**2).sum(), x)
    assert gxx.abs().max() > 0


# ---- torch.func and forward-mode AD (the "torch.func message on our ops") ------------------------------------

FUNC_GRAD_MSG = r"h3fusion_ext\.{op} does not support the differentiating torch\.func transforms"


def _loss_fns():
    x, w, e, gu, dp = (t.detach() for t in ffn_inputs(torch.float32))
    _, weight, targets = (t.detach() for t in logprob_inputs(torch.float32))
    sp = torch.randperm(T * K).to(torch.int32)
    combine_w = torch.rand(T, K)
    return {
        "moe_ffn": (lambda x_: h3fusion_ext.moe_ffn(x_, w, e, gu, dp), x),
        "topk_route": (lambda z: h3fusion_ext.topk_route(z, K)[0], torch.randn(T, E)),
        "linear_logprob": (lambda h: h3fusion_ext.linear_logprob(h, weight, targets), torch.randn(T, H)),
        "moe_gather": (lambda x_: h3fusion_ext.moe_gather(x_, sp, K), x),
        "moe_combine": (lambda r: h3fusion_ext.moe_combine(r, combine_w, sp), torch.randn(T * K, H)),
    }


@pytest.mark.parametrize("op", ["moe_ffn", "topk_route", "linear_logprob", "moe_gather", "moe_combine"])
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "vmap-of-grad"])
def test_torch_func_differentiation_names_the_op(op, transform):
    fn, arg = _loss_fns()[op]
    with pytest.raises(RuntimeError, match=FUNC_GRAD_MSG.format(op=op)):
        if transform == "grad":
            torch.func.grad(lambda a: fn(a).sum())(arg)
        elif transform == "jacrev":
            torch.func.jacrev(fn)(arg)
        elif transform == "jvp":  # silently gave zero tangents before
            torch.func.jvp(fn, (arg,), (torch.randn_like(arg),))
        else:
            torch.func.vmap(torch.func.grad(lambda a: fn(a).sum()))(arg[None].expand(2, *arg.shape))


@pytest.mark.parametrize("op", ["moe_ffn", "topk_route", "linear_logprob"])
def test_forward_mode_ad_names_the_op(op):
    fn, arg = _loss_fns()[op]
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match=rf"h3fusion_ext\.{op} does not support forward-mode AD"):
        fn(fwAD.make_dual(arg, torch.randn_like(arg)))


@pytest.mark.filterwarnings("ignore:.*batching rule.*")
def test_vmap_alone_still_works():
    x, w, e, gu, dp = (t.detach() for t in ffn_inputs(torch.float64, grad=False))
    xs = torch.randn(3, T, H, dtype=torch.float64)
    ys = torch.func.vmap(lambda x_: h3fusion_ext.moe_ffn(x_, w, e, gu, dp))(xs)
    for i in range(3):
        torch.testing.assert_close(ys[i], reference.moe_ffn(xs[i], w, e, gu, dp), rtol=1e-12, atol=1e-12)


# ---- permutation contract of moe_gather / moe_combine (item 4) -----------------------------------------------


@pytest.mark.parametrize("kind", ["repeat", "out of range", "negative"])
def test_gather_rejects_non_permutation(kind):
    x = torch.randn(T, H, requires_grad=True)
    sp = torch.randperm(T * K).to(torch.int32)
    sp[3] = {"repeat": sp[4].item(), "out of range": T * K, "negative": -1}[kind]
    with pytest.raises(RuntimeError, match=r"sorted_pairs must be a permutation of \[0, 12\)"):
        h3fusion_ext.moe_gather(x, sp, K)


def test_combine_rejects_non_permutation():
    rows, w = torch.randn(T * K, H), torch.rand(T, K)
    pair_rows = torch.randperm(T * K).to(torch.int32)
    pair_rows[0] = pair_rows[1]
    with pytest.raises(RuntimeError, match="pair_rows must be a permutation"):
        h3fusion_ext.moe_combine(rows, w, pair_rows)


def test_gather_backward_with_any_permutation_matches_reference():
    # every permutation is valid, not only a plan's: the backward sums each token's k rows
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    sp = torch.randperm(T * K).to(torch.int32)
    g = torch.randn(T * K, H, dtype=torch.float64)
    (ours,) = torch.autograd.grad(h3fusion_ext.moe_gather(x, sp, K), x, g)
    (ref,) = torch.autograd.grad(reference.moe_gather(x, sp, K), x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# ---- every tensor on x's device, meta included (item 5) --------------------------------------------------------


def _to_meta(args, name):
    return {n: (t.detach().to("meta") if n == name else t) for n, t in args.items()}


FFN_ARGS = ["x", "weights", "experts", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("name", FFN_ARGS)
def test_moe_ffn_meta_argument_raises(name):
    x, w, e, gu, dp = ffn_inputs(dtype=torch.float32, grad=False)
    args = dict(x=x, weights=w, experts=e, gate_up_proj=gu, down_proj=dp)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device|device.*\b{name}\b"):
        h3fusion_ext.moe_ffn(**_to_meta(args, name))


@pytest.mark.parametrize("name", ["hidden", "weight", "targets"])
def test_linear_logprob_meta_argument_raises(name):
    hidden, weight, targets = (t.detach() for t in logprob_inputs(torch.float32))
    args = dict(hidden=hidden, weight=weight, targets=targets)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device|device.*\b{name}\b"):
        h3fusion_ext.linear_logprob(**_to_meta(args, name))


@pytest.mark.parametrize("name", ["x", "sorted_pairs"])
def test_moe_gather_meta_argument_raises(name):
    args = dict(x=torch.randn(T, H), sorted_pairs=torch.randperm(T * K).to(torch.int32))
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device|device.*\b{name}\b"):
        h3fusion_ext.moe_gather(**_to_meta(args, name), k=K)


@pytest.mark.parametrize("name", ["rows", "weights", "pair_rows"])
def test_moe_combine_meta_argument_raises(name):
    args = dict(rows=torch.randn(T * K, H), weights=torch.rand(T, K), pair_rows=torch.randperm(T * K).to(torch.int32))
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device|device.*\b{name}\b"):
        h3fusion_ext.moe_combine(**_to_meta(args, name))


@pytest.mark.parametrize("name", ["grad_weights", "logits", "experts"])
def test_topk_route_backward_meta_argument_raises(name):
    logits = torch.randn(T, E)
    _, experts = reference.topk_route(logits, K)
    args = dict(grad_weights=torch.randn(T, K), logits=logits, experts=experts)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device|device.*\b{name}\b"):
        ops.topk_route_backward(**_to_meta(args, name), renormalize=True)


def test_all_meta_still_infers_shapes():
    x, w, e, gu, dp = (t.detach().to("meta") for t in ffn_inputs(dtype=torch.float32, grad=False))
    y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
    assert y.device.type == "meta" and y.shape == (T, H)
    hidden, weight, targets = (t.detach().to("meta") for t in logprob_inputs(torch.float32))
    logp = h3fusion_ext.linear_logprob(hidden, weight, targets)
    assert logp.device.type == "meta" and logp.shape == (T,)


# ---- integer arguments are integers (item 6) -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1.7, 2.0, True, "2", None])
def test_topk_route_rejects_non_integer_k(k):
    with pytest.raises(TypeError, match=r"topk_route: k must be an integer"):
        h3fusion_ext.topk_route(torch.randn(T, E), k)


@pytest.mark.parametrize("k", [np.int64(2), torch.tensor(2), 2])
def test_topk_route_accepts_integer_like_k(k):
    weights, experts = h3fusion_ext.topk_route(torch.randn(T, E), k)
    assert weights.shape == experts.shape == (T, 2)


@pytest.mark.parametrize("k", [0, -1, E + 1])
def test_topk_route_k_out_of_range(k):
    with pytest.raises(RuntimeError, match=r"\bk\b"):
        h3fusion_ext.topk_route(torch.randn(T, E), k)


@pytest.mark.parametrize("k", [2.0, 1.5, False])
def test_moe_gather_rejects_non_integer_k(k):
    with pytest.raises(TypeError, match=r"moe_gather: k must be an integer"):
        h3fusion_ext.moe_gather(torch.randn(T, H), torch.randperm(T * K).to(torch.int32), k)


@pytest.mark.parametrize("num_experts", [4.0, 3.5, True])
def test_route_plan_rejects_non_integer_num_experts(num_experts):
    with pytest.raises(TypeError, match=r"num_experts must be an integer"):
        h3fusion_ext.moe_route_plan(torch.zeros(T, K, dtype=torch.int32), num_experts)


@pytest.mark.parametrize("num_experts", [0, -3, 2**40])
def test_route_plan_num_experts_out_of_range(num_experts):
    with pytest.raises(RuntimeError, match="num_experts"):
        h3fusion_ext.moe_route_plan(torch.zeros(T, K, dtype=torch.int32), num_experts)


@pytest.mark.parametrize("ignore_index", [2**70, -(2**63) - 1, 2**63])
def test_linear_logprob_ignore_index_must_fit_int64(ignore_index):
    hidden, weight, targets = logprob_inputs()
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        h3fusion_ext.linear_logprob(hidden, weight, targets, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [-100.0, 1.5, True])
def test_linear_logprob_ignore_index_must_be_an_integer(ignore_index):
    hidden, weight, targets = logprob_inputs()
    with pytest.raises(TypeError, match=r"ignore_index must be an integer"):
        h3fusion_ext.linear_logprob(hidden, weight, targets, ignore_index=ignore_index)


def test_linear_logprob_extreme_int64_ignore_index_works():
    hidden, weight, targets = logprob_inputs()
    targets[0] = 2**63 - 1
    logp = h3fusion_ext.linear_logprob(hidden, weight, targets, ignore_index=2**63 - 1)
    ref = reference.linear_logprob(hidden, weight, targets, ignore_index=2**63 - 1)
    assert logp[0] == 0
    torch.testing.assert_close(logp, ref, rtol=1e-12, atol=1e-12)


# ---- expert ids outside [0, E) (item 10) ---------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, E, 2**31 - 1])
def test_moe_ffn_cpu_rejects_unrouted_pairs(bad_id):
    x, w, e, gu, dp = ffn_inputs()
    e[1, 0] = bad_id
    with pytest.raises(RuntimeError, match=rf"experts must lie in \[0, num_experts = {E}\), found {bad_id}"):
        h3fusion_ext.moe_ffn(x, w, e, gu, dp)


def test_unrouted_pairs_contract_in_the_reference():
    # The CUDA contract (tests/h3fusion_ext/test_cuda_moe_ffn.py checks the kernels against it): a pair with an
    # expert id outside [0, E) contributes zero and gets zero gradient, exactly as if its weight were 0.
    x, w, e, gu, dp = ffn_inputs()
    bad = torch.zeros(T, K, dtype=torch.bool)
    bad[1, 0], bad[4, 1] = True, True
    e_bad = e.masked_fill(bad, E)
    grad_y = torch.randn(T, H, dtype=torch.float64)
    y = reference.moe_ffn(x, w, e_bad, gu, dp)
    grads = torch.autograd.grad(y, (x, w, gu, dp), grad_y)
    w0 = w.detach().masked_fill(bad, 0).requires_grad_()
    y0 = h3fusion_ext.moe_ffn(x, w0, e, gu, dp)  # our CPU op, the unrouted pairs given weight 0 instead
    grads0 = torch.autograd.grad(y0, (x, w0, gu, dp), grad_y)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    assert (grads[1][bad] == 0).all()
    for i, name in ((0, "x"), (2, "gate_up_proj"), (3, "down_proj")):
        torch.testing.assert_close(grads[i], grads0[i], rtol=1e-12, atol=1e-12, msg=name)
