"""linear_logprob on the CPU against the materialised reference (log_softmax(hidden @ weight.T).gather)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from logprob_cases import IGNORE, logprob_inputs, run_logprob, set_chunking

import h3fusion_ext
from h3fusion_ext import linear_logprob, reference

# (vocab chunk, block elements): the default plan, several chunks with 2-row blocks, one-row blocks with a chunk
# that does not divide V; set through the kernel's environment knobs so tiny shapes exercise every loop.
CHUNKINGS = [None, (3, 7), (4, 1)]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("shape", [(7, 5, 11), (1, 3, 2), (16, 8, 32), (5, 4, 1)])
def test_fp64_matches_reference(monkeypatch, chunking, shape):
    set_chunking(monkeypatch, chunking)
    n, h, v = shape
    hidden, weight, targets = logprob_inputs(n, h, v, torch.float64)
    gl, gs = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    ours = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    ref = run_logprob(reference.linear_logprob, hidden, weight, targets, gl, gs)
    for name, a, b in zip(("logp", "lse", "grad_hidden", "grad_weight"), ours, ref, strict=True):
        assert a.dtype == b.dtype == torch.float64, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    assert (ours[0][targets == IGNORE] == 0).all()


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_gradcheck(monkeypatch, chunking):
    set_chunking(monkeypatch, chunking)
    hidden, weight, targets = logprob_inputs(5, 3, 7, torch.float64)
    targets[0] = IGNORE
    hidden.requires_grad_()
    weight.requires_grad_()

    def both(h, w):
        return linear_logprob(h, w, targets, return_lse=True)

    assert torch.autograd.gradcheck(both, (hidden, weight))
    assert torch.autograd.gradcheck(lambda h, w: linear_logprob(h, w, targets), (hidden, weight))


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(monkeypatch, chunking, dtype):
    set_chunking(monkeypatch, chunking)
    n, h, v = 24, 16, 37
    hidden, weight, targets = logprob_inputs(n, h, v, dtype)
    gl, gs = torch.randn(n), torch.randn(n)
    ours = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    lowp = run_logprob(reference.linear_logprob, hidden, weight, targets, gl, gs)
    ref = run_logprob(reference.linear_logprob, hidden.double(), weight.double(), targets, gl.double(), gs.double())
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    for i, name in enumerate(("logp", "lse", "grad_hidden", "grad_weight")):
        assert_close_to_reference(ours[i], lowp[i], ref[i], factor=2 if i < 2 else 3, what=f"{dtype} {name}")


def test_return_lse_values_and_default_output():
    hidden, weight, targets = logprob_inputs(9, 6, 13, torch.float64)
    logp, lse = linear_logprob(hidden, weight, targets, return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(hidden @ weight.T, dim=-1))
    torch.testing.assert_close(linear_logprob(hidden, weight, targets), logp, rtol=0, atol=0)


def test_lse_gradient_alone_reaches_ignored_rows():
    # Documented choice: lse is defined and differentiable on ignored rows too.
    hidden, weight, targets = logprob_inputs(6, 4, 9, torch.float64)
    targets[:] = IGNORE
    h = hidden.clone().requires_grad_()
    _, lse = linear_logprob(h, weight, targets, return_lse=True)
    lse.sum().backward()
    expected = torch.softmax(hidden @ weight.T, dim=-1) @ weight
    torch.testing.assert_close(h.grad, expected)


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_all_targets_ignored(monkeypatch, chunking):
    set_chunking(monkeypatch, chunking)
    hidden, weight, targets = logprob_inputs(8, 5, 10, torch.float32)
    targets[:] = IGNORE
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprob(h, w, targets)
    assert torch.equal(logp, torch.zeros(8))
    (logp * torch.randn(8)).sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_empty_batch(monkeypatch, chunking):
    set_chunking(monkeypatch, chunking)
    hidden, weight, targets = logprob_inputs(0, 5, 10, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, lse = linear_logprob(h, w, targets, return_lse=True)
    assert logp.shape == (0,) and lse.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + lse.sum()).backward()
    assert h.grad.shape == (0, 5)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_int32_targets_custom_ignore_index_and_noncontiguous_inputs():
    hidden, weight, targets = logprob_inputs(10, 6, 12, torch.float64, ignore_frac=0.0)
    targets[3] = 5
    hidden_t = hidden.T.contiguous().T  # same values, column-major strides
    weight_t = weight.T.contiguous().T
    ours = linear_logprob(hidden_t, weight_t, targets.to(torch.int32), ignore_index=5)
    ref = reference.linear_logprob(hidden, weight, targets, ignore_index=5)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert (ours[targets == 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype, monkeypatch):
    set_chunking(monkeypatch, (5, 12))
    n, h, v = 20, 12, 23
    hidden, weight, targets = logprob_inputs(n, h, v, dtype)
    gl, gs = torch.randn(n), torch.randn(n)
    first = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    second = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [12, -1, -101])
def test_target_out_of_range_names_targets(bad):
    hidden, weight, targets = logprob_inputs(4, 3, 12, torch.float32)
    targets[2] = bad
    with pytest.raises(RuntimeError, match=r"targets\[2\]"):
        linear_logprob(hidden, weight, targets)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda h, w, t: (h[0], w, t), "hidden"),
        (lambda h, w, t: (h, w[0], t), "weight"),
        (lambda h, w, t: (h, w, t[:, None]), "targets"),
        (lambda h, w, t: (h, w[:, :-1], t), "weight"),
        (lambda h, w, t: (h, w, t[:-1]), "targets"),
        (lambda h, w, t: (h, w.double(), t), "weight"),
        (lambda h, w, t: (h, w, t.float()), "targets"),
        (lambda h, w, t: (h.long(), w.long(), t), "hidden"),
        (lambda h, w, t: (h, w[:0], t), "weight"),
    ],
)
def test_bad_inputs_name_the_argument(make, name):
    hidden, weight, targets = logprob_inputs(4, 3, 6, torch.float32)
    with pytest.raises(RuntimeError, match=name):
        linear_logprob(*make(hidden, weight, targets))


def test_backward_op_checks_its_vectors():
    hidden, weight, targets = logprob_inputs(4, 3, 6, torch.float32)
    _, lse = torch.ops.h3fusion.linear_logprob_forward(hidden, weight, targets, IGNORE)
    with pytest.raises(RuntimeError, match="grad_logp"):
        torch.ops.h3fusion.linear_logprob_backward(torch.ones(3), torch.ones(4), hidden, weight, targets, lse, IGNORE)
    with pytest.raises(RuntimeError, match="grad_lse"):
        torch.ops.h3fusion.linear_logprob_backward(
            torch.ones(4), torch.ones(4, 1), hidden, weight, targets, lse, IGNORE
        )


def test_opcheck():
    hidden, weight, targets = logprob_inputs(6, 4, 9, torch.float32)
    fwd_args = (hidden.requires_grad_(), weight.requires_grad_(), targets, IGNORE)
    torch.library.opcheck(torch.ops.h3fusion.linear_logprob_forward.default, fwd_args)
    logp, lse = torch.ops.h3fusion.linear_logprob_forward(*fwd_args)
    bwd_args = (torch.randn(6), torch.randn(6), hidden.detach(), weight.detach(), targets, lse.detach(), IGNORE)
    torch.library.opcheck(torch.ops.h3fusion.linear_logprob_backward.default, bwd_args)


def test_compile_traces_the_op():
    hidden, weight, targets = logprob_inputs(6, 4, 9, torch.float32)
    fn = torch.compile(lambda h, w, t: linear_logprob(h, w, t) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(hidden, weight, targets), 2 * reference.linear_logprob(hidden, weight, targets))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 12),
    h=st.integers(1, 7),
    v=st.integers(1, 19),
    chunk=st.integers(1, 8),
    block=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes_fp64(n, h, v, chunk, block, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=gen)
    weight = torch.randn(v, h, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.2] = IGNORE
    gl = torch.randn(n, dtype=torch.float64, generator=gen)
    gs = torch.randn(n, dtype=torch.float64, generator=gen)
    with pytest.MonkeyPatch.context() as mp:
        set_chunking(mp, (chunk, block))
        ours = run_logprob(linear_logprob, hidden, weight, targets, gl, gs)
    ref = run_logprob(reference.linear_logprob, hidden, weight, targets, gl, gs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_autocast_casts_both_operands():
    hidden, weight, targets = logprob_inputs(8, 16, 21, torch.float32)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_logprob(hidden.bfloat16(), w, targets)
    logp.sum().backward()
    expected = reference.linear_logprob(hidden.bfloat16(), weight.bfloat16(), targets)
    torch.testing.assert_close(logp, expected, rtol=2e-2, atol=2e-2)
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_public_name_is_the_op():
    assert h3fusion_ext.linear_logprob is linear_logprob
