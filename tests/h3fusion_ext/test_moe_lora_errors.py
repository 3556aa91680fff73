"""Bad input to moe_ffn with LoRA raises an error that names the offending argument (design.md §5, §10)."""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext
from h3fusion_ext import ExpertLoRA

T, H, F, E, K, R = 6, 8, 5, 4, 2, 3


def good(dtype=torch.float32, shared=False):
    Eb = 1 if shared else E
    args = dict(
        x=torch.randn(T, H, dtype=dtype),
        weights=torch.rand(T, K),
        experts=torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32),
        gate_up_proj=torch.randn(Eb, 2 * F, H, dtype=dtype),
        down_proj=torch.randn(Eb, H, F, dtype=dtype),
    )
    factors = dict(
        gate_up_a=torch.randn(E, R, H, dtype=dtype),
        gate_up_b=torch.randn(E, 2 * F, R, dtype=dtype),
        down_a=torch.randn(E, R, F, dtype=dtype),
        down_b=torch.randn(E, H, R, dtype=dtype),
    )
    return args, factors


def call(args, factors, scaling=2.0, activation="silu"):
    return h3fusion_ext.moe_ffn(**args, lora=ExpertLoRA(**factors, scaling=scaling), activation=activation)


@pytest.mark.parametrize("shared", [False, True])
def test_good_inputs_run(shared):
    assert call(*good(shared=shared)).shape == (T, H)


@pytest.mark.parametrize(
    "name,shape,match",
    [
        ("gate_up_b", (E, 2 * F, R + 1), r"gate_up_b\.shape\[2\] must equal gate_up_a\.shape\[1\] \(the rank r\)"),
        ("down_a", (E, R - 1, F), r"down_a\.shape\[1\] must equal gate_up_a\.shape\[1\] \(the rank r\)"),
        ("down_b", (E, H, R + 2), r"down_b\.shape\[2\]"),
        ("gate_up_b", (E - 1, 2 * F, R), r"gate_up_b\.shape\[0\] must equal gate_up_a\.shape\[0\] \(E\)"),
        ("down_b", (E + 1, H, R), r"down_b\.shape\[0\]"),
        ("gate_up_a", (E, R, H + 1), r"gate_up_a\.shape\[2\] must equal x\.shape\[1\]"),
        ("gate_up_b", (E, 2 * F + 2, R), r"gate_up_b\.shape\[1\] must equal gate_up_proj\.shape\[1\]"),
        ("down_a", (E, R, F + 1), r"down_a\.shape\[2\]"),
        ("down_b", (E, H - 1, R), r"down_b\.shape\[1\]"),
        ("gate_up_a", (R, H), r"gate_up_a must be a 3-D tensor"),
        ("gate_up_a", (E, 0, H), r"gate_up_a\.shape\[1\] \(the LoRA rank r\) must be >= 1"),
        ("gate_up_a", (0, R, H), r"gate_up_a\.shape\[0\] \(the number of experts E\) must be >= 1"),
    ],
)
def test_factor_shapes(name, shape, match):
    args, factors = good()
    factors[name] = torch.randn(*shape)
    with pytest.raises(RuntimeError, match=match):
        call(args, factors)


@pytest.mark.parametrize(
    "name,shape,match",
    [
        ("gate_up_proj", (E + 1, 2 * F, H), r"gate_up_proj\.shape\[0\] must be 1 \(a base shared by every expert\) or"),
        ("gate_up_proj", (2, 2 * F, H), r"gate_up_proj\.shape\[0\] must be 1"),
        ("down_proj", (1, H, F), r"down_proj\.shape\[0\] must equal gate_up_proj\.shape\[0\]"),
        ("down_proj", (E, H, F + 1), r"down_proj\.shape\[2\]"),
        ("gate_up_proj", (E, 2 * F + 1, H), r"gate_up_proj\.shape\[1\] must be even"),
        ("gate_up_proj", (E, 2 * F, H + 1), r"gate_up_proj\.shape\[2\] must equal x\.shape\[1\]"),
    ],
)
def test_base_shapes(name, shape, match):
    args, factors = good()
    args[name] = torch.randn(*shape)
    with pytest.raises(RuntimeError, match=match):
        call(args, factors)


@pytest.mark.parametrize("name", ["gate_up_a", "gate_up_b", "down_a", "down_b", "gate_up_proj", "down_proj"])
def test_dtype_mismatch(name):
    args, factors = good()
    (factors if name in factors else args)[name] = (factors if name in factors else args)[name].double()
    with pytest.raises(RuntimeError, match=rf"{name} must have the same dtype as x"):
        call(args, factors)


@pytest.mark.parametrize("name", ["gate_up_a", "gate_up_b", "down_a", "down_b", "down_proj", "weights"])
def test_meta_argument_is_refused(name):
    args, factors = good()
    group = factors if name in factors else args
    group[name] = group[name].to("meta")
    with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as x"):
        call(args, factors)


def test_experts_out_of_range_and_bad_shape():
    args, factors = good()
    args["experts"] = args["experts"].clone()
    args["experts"][2, 1] = E
    with pytest.raises(RuntimeError, match="experts"):
        call(args, factors)
    args, factors = good()
    args["experts"] = args["experts"][:, :1]
    with pytest.raises(RuntimeError, match=r"experts\.shape\[1\] must equal weights\.shape\[1\]"):
        call(args, factors)


@pytest.mark.parametrize("scaling", ["2", None, True, torch.tensor(2.0)])
def test_scaling_must_be_a_number(scaling):
    with pytest.raises(TypeError, match=r"lora\.scaling must be a real number"):
        call(*good(), scaling=scaling)


@pytest.mark.parametrize("scaling", [float("nan"), float("inf")])
def test_scaling_must_be_finite(scaling):
    with pytest.raises(RuntimeError, match="scaling .* must be finite"):
        call(*good(), scaling=scaling)


def test_scaling_may_be_an_int():
    args, factors = good()
    torch.testing.assert_close(call(args, factors, scaling=2), call(args, factors, scaling=2.0), rtol=0, atol=0)


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        call(*good(), activation="relu")
    args, factors = good()
    with pytest.raises(RuntimeError, match='activation must be one of "silu", "gelu", "gelu_tanh"'):
        torch.ops.h3fusion.moe_lora_ffn_forward(*args.values(), *factors.values(), 1.0, "relu", False)


def test_lora_must_be_expert_lora():
    args, factors = good()
    with pytest.raises(TypeError, match=r"lora must be an h3fusion_ext\.ExpertLoRA"):
        h3fusion_ext.moe_ffn(**args, lora=(*factors.values(), 1.0))


def test_func_transforms_and_forward_ad_are_refused():
    args, factors = good()
    lora = ExpertLoRA(**factors, scaling=1.0)
    with pytest.raises(RuntimeError, match=r"h3fusion_ext\.moe_lora_ffn does not support the differentiating"):
        torch.func.grad(lambda x: h3fusion_ext.moe_ffn(x, *list(args.values())[1:], lora=lora).sum())(args["x"])
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match=r"moe_lora_ffn does not support forward-mode AD"):
        dual = fwAD.make_dual(args["x"], torch.randn_like(args["x"]))
        h3fusion_ext.moe_ffn(dual, *list(args.values())[1:], lora=lora)
