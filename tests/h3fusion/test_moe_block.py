"""H3FusionMoE: against the plain-PyTorch oracle and against transformers' MixtralSparseMoeBlock with copied weights,
values and gradients, fp32 / bf16 / fp16, CPU (and CUDA when present)."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU, assert_close_to_reference
from h3fusion import H3FusionMoE

import h3fusion_ext

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def _oracle(block: H3FusionMoE, x: torch.Tensor, dtype: torch.dtype):
    """The design.md §2 formula in `dtype` with the plain-PyTorch reference ops (router logits in fp32 or fp64)."""
    gu, dp = (p.detach().to(dtype).requires_grad_() for p in (block.experts.gate_up_proj, block.experts.down_proj))
    wr = block.router.weight.detach().to(dtype).requires_grad_()
    xx = x.detach().reshape(-1, x.shape[-1]).to(dtype).requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.nn.functional.linear(xx.to(acc), wr.to(acc))
    w, e = h3fusion_ext.reference.topk_route(logits, block.top_k, block.renormalize)
    y = h3fusion_ext.reference.moe_ffn(xx, w, e, gu, dp)
    return y, logits, (xx, wr, gu, dp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,k,renorm", [(4, 2, True), (3, 1, True), (5, 5, False), (1, 1, True)])
def test_matches_oracle_values_and_grads(device, dtype, E, k, renorm):
    H, F_, T = 24, 40, 13
    # Parameters and inputs are rounded to `dtype` first, so the fp64 oracle sees exactly the values we see.
    block = H3FusionMoE(H, F_, E, k, renormalize=renorm, initializer_range=0.2).to(device=device, dtype=dtype)
    x = torch.randn(3, T, H, device=device).to(dtype)
    ref64, logits64, leaves64 = _oracle(block, x, torch.float64)
    reflow, _, leaveslow = _oracle(block, x, dtype)

    xx = x.clone().requires_grad_()
    y, logits = block(xx)
    assert y.shape == x.shape and y.dtype == dtype
    assert logits.shape == (3 * T, E) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), logits64.detach(), rtol=1e-4, atol=1e-5)
    # y's floor is 2 ulps: over 2000 draws (bf16; fp16 alike over 1000) our y was off by at most 1.48 ulps of its
    # largest value (median 0.59) and PyTorch's own by up to 1.90 (median 0.76), so 2x a lucky PyTorch error (0.45
    # ulps, seed 1831290072) failed a correct 1.1-ulp result
    assert_close_to_reference(y.reshape(-1, H), reflow, ref64, factor=2, what="y", ulps=2)

    g = torch.randn_like(ref64)
    y.reshape(-1, H).backward(g.to(dtype))
    reflow.backward(g.to(dtype))
    ref64.backward(g)
    ex = block.experts
    ours = (xx.grad.reshape(-1, H), block.router.weight.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
    for name, o, lo, hi in zip(("x", "router", "gate_up", "down"), ours, leaveslow, leaves64, strict=True):
        # the router gets no gradient when the routing weights are constant: one expert, or renormalised
        # weights with k=1 (always 1) or k=E (all kept)
        constant = E == 1 or (renorm and k in (1, E))
        assert o is not None and (o.abs().sum() > 0 or (name == "router" and constant)), name
        assert_close_to_reference(o, lo.grad, hi.grad, factor=3, atol=1e-5, what=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_block_is_exact_in_fp64(device):
    # an fp64 model (the exact oracle of the distributed tests) must never round router logits or routing weights
    # to fp32 on the way: fp32 logits put ~1e-8 relative error into the router's gradient
    H, F_, E, T = 16, 24, 4, 11
    block = H3FusionMoE(H, F_, E, 2, initializer_range=0.2).to(device=device, dtype=torch.float64)
    x = torch.randn(2, T, H, device=device, dtype=torch.float64)
    ref, logits64, leaves = _oracle(block, x, torch.float64)
    xx = x.clone().requires_grad_()
    y, logits = block(xx)
    assert logits.dtype == torch.float64 and y.dtype == torch.float64
    torch.testing.assert_close(logits, logits64, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(y.reshape(-1, H), ref, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(ref)
    y.reshape(-1, H).backward(g)
    ref.backward(g)
    ex = block.experts
    ours = (xx.grad.reshape(-1, H), block.router.weight.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
    for name, o, want in zip(("x", "router", "gate_up", "down"), ours, leaves, strict=True):
        torch.testing.assert_close(o, want.grad, rtol=1e-12, atol=1e-13, msg=name)


def test_empty_input_and_bad_arguments():
    block = H3FusionMoE(16, 8, 4, 2)
    y, logits = block(torch.randn(0, 16))
    assert y.shape == (0, 16) and logits.shape == (0, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        block(torch.randn(5, 15))
    with pytest.raises(ValueError, match="top_k"):
        H3FusionMoE(16, 8, 2, 3)
    with pytest.raises(ValueError, match="num_experts"):
        H3FusionMoE(16, 8, 0, 1)


def _mixtral_block(H, F_, E, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_mixtral_block(dtype):
    H, F_, E, k = 32, 48, 4, 2
    hf = _mixtral_block(H, F_, E, k)
    ours = H3FusionMoE(H, F_, E, k)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    hf.to(dtype)  # round the weights once: every run below sees the same values
    ours.to(dtype)
    x = torch.randn(2, 11, H).to(dtype)
    g = torch.randn(2, 11, H)

    def run(module, dt, mine):
        m = module.to(dt)
        for p in m.parameters():
            p.grad = None
        xx = x.to(dt).requires_grad_()
        y = m(xx)[0] if mine else m(xx)
        y.backward(g.to(dt))
        grads = [xx.grad] + [p.grad for p in m.parameters()]
        return y, grads

    # transformers' own block in fp64 is the precise reference; in `dtype` it is PyTorch's own error.
    y64, g64 = run(hf, torch.float64, False)
    ylo, glo = run(hf, dtype, False)
    y, gs = run(ours, dtype, True)
    assert_close_to_reference(y, ylo, y64, factor=2, what="y")
    # parameter order: ours (router, gate_up, down) vs transformers' (router, gate_up, down)
    for name, a, b, c in zip(("x", "router", "gate_up", "down"), gs, glo, g64, strict=True):
        assert_close_to_reference(a, b, c, factor=3, atol=1e-5, what=f"grad {name}")


def test_from_hf_block_shares_parameters():
    hf = _mixtral_block(16, 24, 3, 2)
    ours = H3FusionMoE.from_hf_block(hf)
    assert ours.router.weight is hf.gate.weight and ours.experts.down_proj is hf.experts.down_proj
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x.unsqueeze(0))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_from_hf_block_keeps_a_gelu_activation(hidden_act):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=3, num_experts_per_tok=2)
    cfg.hidden_act = hidden_act
    cfg._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = H3FusionMoE.from_hf_block(hf)
    assert ours.experts.activation == ("gelu" if hidden_act == "gelu" else "gelu_tanh")
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x.unsqueeze(0))[0], rtol=1e-5, atol=1e-6)
    plain = H3FusionMoE(16, 24, 3, 2, activation="gelu")
    assert plain.experts.activation == "gelu" and "activation=gelu" in repr(plain)


def test_from_hf_block_refuses_a_peft_wrapped_block():
    peft = pytest.importorskip("peft")

    class Holder(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.mlp = block

    model = Holder(_mixtral_block(16, 24, 3, 2))
    cfg = peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    wrapped = peft.get_peft_model(model, cfg).base_model.model.mlp
    # sharing the raw parameters would silently drop the adapters' BA
    with pytest.raises(ValueError, match="merge the adapters"):
        H3FusionMoE.from_hf_block(wrapped)
