"""moe_ffn's gated activations (silu, gelu, gelu_tanh) against the reference: values, every gradient, fp64
gradcheck, low precision, the vector/tail split of the CPU row passes, extreme gate values, opcheck, fuzzing."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import h3fusion_ext
from h3fusion_ext import reference
from h3fusion_ext._library import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
GELUS = ["gelu", "gelu_tanh"]


def make_inputs(T, H, F, E, k, dtype, device="cpu", gen=None, scale=1.0):
    """Random MoE inputs with routing from real logits; `scale` widens the pre-activations (tails of the gates)."""
    logits = torch.randn(T, E, generator=gen).to(device)
    weights, experts = reference.topk_route(logits, k)
    x = (torch.randn(T, H, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    gate_up = (torch.randn(E, 2 * F, H, generator=gen, dtype=torch.float64) / H**0.5).to(device, dtype)
    down = (torch.randn(E, H, F, generator=gen, dtype=torch.float64) / F**0.5).to(device, dtype)
    return x, weights, experts, gate_up, down


def forward_backward(fn, inputs, grad_y, activation, dtype=None):
    """y and the gradients of (x, weights, gate_up_proj, down_proj); inputs cast to `dtype` when given."""
    x, w, e, gu, dp = inputs
    leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in (x, w, gu, dp)]
    y = fn(leaves[0], leaves[1], e, leaves[2], leaves[3], activation=activation)
    grads = torch.autograd.grad(y, leaves, grad_y.to(y.dtype))
    return y.detach(), grads


def ours(x, w, e, gu, dp, activation):
    return h3fusion_ext.moe_ffn(x, w, e, gu, dp, activation=activation)


def theirs(x, w, e, gu, dp, activation):
    return reference.moe_ffn(x, w, e, gu, dp, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_activation_is_torch(activation):
    # The oracle itself: gelu is torch's exact GELU, gelu_tanh its tanh approximation (transformers'
    # "gelu_pytorch_tanh"), silu is SiLU.
    g, u = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    torch_fn = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh")}
    torch.testing.assert_close(reference.gated_activation(g, u, activation), torch_fn[activation](g) * u)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", GELUS)
# F = 40 and 7: 16-lane vector blocks plus a scalar tail on the CPU, and a tail only.
@pytest.mark.parametrize("T,H,F,E,k", [(40, 16, 40, 4, 2), (64, 32, 7, 16, 4), (3, 37, 19, 8, 2)])
def test_fp32_matches_fp64_reference(device, activation, T, H, F, E, k):
    if device == "cuda" and F % 8:
        F = 16  # the torch GEMM backend needs 16-byte rows; keep the shape valid for both backends
    inputs = make_inputs(T, H, F, E, k, torch.float32, device, torch.Generator().manual_seed(T + F))
    grad_y = torch.randn(T, H, device=device)
    y, grads = forward_backward(ours, inputs, grad_y, activation)
    ref_y, ref_grads = forward_backward(theirs, inputs, grad_y, activation, torch.float64)
    lowp_y, lowp_grads = forward_backward(theirs, inputs, grad_y, activation)
    assert_close_to_reference(y, lowp_y, ref_y, factor=2.0, what=f"{activation} y")
    for name, g, lg, rg in zip(("x", "weights", "gate_up_proj", "down_proj"), grads, lowp_grads, ref_grads, strict=True):
        assert_close_to_reference(g, lg, rg, factor=3.0, atol=1e-5, what=f"{activation} grad {name}")


@pytest.mark.parametrize("activation", GELUS)
def test_fp64_matches_reference_tightly(activation):
    inputs = make_inputs(33, 12, 21, 5, 2, torch.float64, gen=torch.Generator().manual_seed(1))
    grad_y = torch.randn(33, 12, dtype=torch.float64)
    y, grads = forward_backward(ours, inputs, grad_y, activation)
    ref_y, ref_grads = forward_backward(theirs, inputs, grad_y, activation)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-11)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("activation", GELUS)
def test_gradcheck_fp64(activation):
    x, w, e, gu, dp = make_inputs(6, 5, 4, 3, 2, torch.float64, gen=torch.Generator().manual_seed(2))
    args = tuple(t.clone().requires_grad_() for t in (x, w.double(), gu, dp))
    assert torch.autograd.gradcheck(lambda x, w, gu, dp: ours(x, w, e, gu, dp, activation), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", GELUS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(device, activation, dtype):
    inputs = make_inputs(48, 32, 48, 4, 2, dtype, device, torch.Generator().manual_seed(3))
    grad_y = torch.randn(48, 32, device=device)
    y, grads = forward_backward(ours, inputs, grad_y, activation)
    ref_y, ref_grads = forward_backward(theirs, inputs, grad_y, activation, torch.float64)
    lowp_y, lowp_grads = forward_backward(theirs, inputs, grad_y, activation)
    assert y.dtype == dtype
    assert_close_to_reference(y, lowp_y, ref_y, factor=2.0, what=f"{activation} {dtype} y")
    for name, g, lg, rg in zip(("x", "weights", "gate_up_proj", "down_proj"), grads, lowp_grads, ref_grads, strict=True):
        assert_close_to_reference(g, lg, rg, factor=3.0, atol=1e-3, what=f"{activation} {dtype} grad {name}")


def elementwise_probe(gates: torch.Tensor, dtype):
    """One token and one expert wired so that the op exposes act(g_f) and act'(g_f) element by element.

    x = [1, 1]; gate row f reads g_f * x[0], up row f reads x[1] = 1, so gate_f = g_f and up_f = 1; down row 0 sums
    the F activations. With grad_y = [1, 0] and w = 1: grad_gate_up[0, f, 0] = act'(g_f), and
    grad_gate_up[0, F + f, 1] = act(g_f).
    """
    F = gates.numel()
    x = torch.ones(1, 2, dtype=dtype)
    gate_up = torch.zeros(1, 2 * F, 2, dtype=dtype)
    gate_up[0, :F, 0] = gates.to(dtype)
    gate_up[0, F:, 1] = 1
    down = torch.zeros(1, 2, F, dtype=dtype)
    down[0, 0] = 1
    return x, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), gate_up.requires_grad_(), down


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_and_derivative_elementwise(activation, dtype):
    # Gates over the whole range, tails included (Phi underflowing, the clamped exp), in the vector lanes and the
    # scalar tail of the CPU row passes (F = 51 = 3 x 16 + 3).
    gates = torch.cat([torch.linspace(-40, 40, 45, dtype=torch.float64), torch.tensor([0.0, 1e-4, -1e-4, 3, -3, 7])])
    x, w, e, gate_up, down = elementwise_probe(gates, dtype)
    y = ours(x, w, e, gate_up, down, activation)
    (grad_gu,) = torch.autograd.grad(y, gate_up, torch.tensor([[1.0, 0.0]], dtype=dtype))
    F = gates.numel()
    g = gates.to(dtype).double().requires_grad_()
    want = reference.gated_activation(g, torch.ones_like(g), activation)
    (want_grad,) = torch.autograd.grad(want.sum(), g)
    tol = dict(atol=1e-7, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-12)
    assert torch.isfinite(grad_gu).all() and torch.isfinite(y).all()
    torch.testing.assert_close(grad_gu[0, F:, 1].double(), want.detach(), **tol, msg=lambda m: f"act: {m}")
    torch.testing.assert_close(grad_gu[0, :F, 0].double(), want_grad, **tol, msg=lambda m: f"act': {m}")


@pytest.mark.parametrize("activation", GELUS)
def test_activations_differ(activation):
    # A kernel that ignored the argument (always SwiGLU) would pass none of the checks above; this one says so.
    inputs = make_inputs(16, 8, 16, 3, 2, torch.float64, gen=torch.Generator().manual_seed(5))
    assert not torch.allclose(ours(*inputs, activation), ours(*inputs, "silu"))


@pytest.mark.parametrize("activation", GELUS)
def test_inference_forward_is_bitwise_the_training_forward(activation):
    inputs = make_inputs(64, 16, 40, 4, 2, torch.bfloat16, gen=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y_inference = ours(*inputs, activation)
    x = inputs[0].clone().requires_grad_()
    y_train = ours(x, *inputs[1:], activation)
    assert torch.equal(y_inference, y_train.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", GELUS)
def test_opcheck(device, activation):
    x, w, e, gu, dp = make_inputs(12, 8, 8, 3, 2, torch.float32, device, torch.Generator().manual_seed(7))
    args = (x.requires_grad_(), w.requires_grad_(), e, gu.requires_grad_(), dp.requires_grad_(), True, activation)
    torch.library.opcheck(ops.moe_ffn_forward, args)
    with torch.no_grad():
        y, sp, pr, off, h = ops.moe_ffn_forward(*args)
    backward_args = (torch.randn_like(y), x.detach(), w.detach(), gu.detach(), dp.detach(), sp, pr, off, h)
    torch.library.opcheck(ops.moe_ffn_backward, (*backward_args, [True, True, True, True], activation))


def test_unknown_activation_is_refused():
    inputs = make_inputs(4, 8, 8, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        ours(*inputs, "relu")
    with pytest.raises(RuntimeError, match='activation must be one of "silu", "gelu", "gelu_tanh", got "relu"'):
        ops.moe_ffn_forward(*inputs, False, "relu")


@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(0, 30),
    H=st.integers(1, 20),
    F=st.integers(1, 40),
    E=st.integers(1, 6),
    activation=st.sampled_from(GELUS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_fp64(T, H, F, E, activation, seed):
    k = min(2, E)
    inputs = make_inputs(T, H, F, E, k, torch.float64, gen=torch.Generator().manual_seed(seed), scale=3.0)
    grad_y = torch.randn(T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    y, grads = forward_backward(ours, inputs, grad_y, activation)
    ref_y = theirs(*inputs, activation)
    torch.testing.assert_close(y, ref_y, atol=1e-10, rtol=1e-9)
    if T == 0:  # the reference returns a constant there; ours must still have (empty or zero) gradients
        assert all(g.abs().sum() == 0 for g in grads)
        return
    _, ref_grads = forward_backward(theirs, inputs, grad_y, activation)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-9)
