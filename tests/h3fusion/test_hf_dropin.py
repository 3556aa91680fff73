"""The transformers drop-in: experts_implementation="h3fusion" and replace_moe_blocks give the eager model's logits
and gradients on Mixtral, Qwen3-MoE, Qwen2-MoE (shared expert) and OLMoE; unsupported layouts are refused."""

from __future__ import annotations

import copy

import h3fusion  # noqa: F401  (registers "h3fusion")
import pytest
import torch
from h3fusion import replace_moe_blocks
from torch import nn

VOCAB, H, LAYERS = 96, 32, 2


def _config(kind: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3, head_dim=8,
            norm_topk_prob=True, **common,
        )  # fmt: skip
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=False, **common,
        )  # fmt: skip
    return OlmoeConfig(intermediate_size=24, num_experts=4, num_experts_per_tok=2, **common)


def _model(kind: str):
    from transformers import AutoModelForCausalLM

    cfg = _config(kind)
    cfg._experts_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # Qwen routers start at zero (every expert tied): make routing decisive
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model.train()


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_registered_in_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert "h3fusion" in ALL_EXPERTS_FUNCTIONS
    assert h3fusion.register_experts_implementation() is True  # idempotent


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_experts_implementation_and_replace_match_eager(kind):
    eager = _model(kind)
    via_interface = copy.deepcopy(eager)
    if hasattr(via_interface, "set_experts_implementation"):
        via_interface.set_experts_implementation("h3fusion")
    else:  # early transformers 5.x: the experts read the config at each forward
        via_interface.config._experts_implementation = "h3fusion"
    assert via_interface.config._experts_implementation == "h3fusion"
    replaced = copy.deepcopy(eager)
    assert replace_moe_blocks(replaced) == LAYERS
    assert replace_moe_blocks(replaced) == LAYERS  # idempotent
    ids = torch.randint(0, VOCAB, (2, 10))
    ref = _logits_and_grads(eager, ids)
    _assert_same(_logits_and_grads(via_interface, ids), ref)
    _assert_same(_logits_and_grads(replaced, ids), ref)
    # the router gets a gradient through our topk_route
    assert any("mlp.gate.weight" in n and g.abs().sum() > 0 for n, g in ref[1].items())


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh", "gelu_new"])
def test_gelu_gated_experts_match_eager(hidden_act):
    """GeGLU experts (exact and tanh GELU) run on moe_ffn's gelu / gelu_tanh and give the eager model's logits and
    gradients, through the experts interface and replace_moe_blocks."""
    from transformers import AutoModelForCausalLM

    cfg = _config("mixtral")
    cfg.hidden_act = hidden_act
    cfg._experts_implementation = "eager"
    eager = AutoModelForCausalLM.from_config(cfg).float().train()
    expected = "gelu" if hidden_act == "gelu" else "gelu_tanh"
    assert h3fusion.models.hf_experts.experts_activation(eager.model.layers[0].mlp.experts) == expected
    via_interface = copy.deepcopy(eager)
    via_interface.set_experts_implementation("h3fusion")
    replaced = copy.deepcopy(eager)
    assert replace_moe_blocks(replaced) == LAYERS
    ids = torch.randint(0, VOCAB, (2, 10))
    ref = _logits_and_grads(eager, ids)
    _assert_same(_logits_and_grads(via_interface, ids), ref)
    _assert_same(_logits_and_grads(replaced, ids), ref)
    # and a SwiGLU kernel would not have matched: the activations really differ on this model
    silu = copy.deepcopy(eager)
    silu.config.hidden_act = "silu"
    for layer in silu.model.layers:
        layer.mlp.experts.act_fn = torch.nn.SiLU()
    assert not torch.allclose(_logits_and_grads(silu, ids)[0], ref[0], atol=1e-4)


def test_unsupported_activation_is_refused_by_name():
    from transformers import MixtralConfig
    from transformers.activations import ACT2FN
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = MixtralTopKRouter(MixtralConfig(hidden_size=8, num_local_experts=4, num_experts_per_tok=2))
    experts = _Experts()
    experts.act_fn = ACT2FN["quick_gelu"]
    with pytest.raises(NotImplementedError, match="activation 'QuickGELUActivation'"):
        replace_moe_blocks(nn.Sequential(_Block(router, experts)))


@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe"])
def test_replace_keeps_shared_expert_and_other_layouts(kind):
    eager = _model(kind)
    replaced = copy.deepcopy(eager)
    assert replace_moe_blocks(replaced) == LAYERS
    ids = torch.randint(0, VOCAB, (2, 9))
    _assert_same(_logits_and_grads(replaced, ids), _logits_and_grads(eager, ids))


def test_router_logits_still_recorded_after_replace():
    model = _model("mixtral").eval()
    replace_moe_blocks(model)
    out = model(torch.randint(0, VOCAB, (1, 6)), output_router_logits=True)
    assert len(out.router_logits) == LAYERS and out.router_logits[0].shape == (6, 4)
    assert torch.isfinite(out.aux_loss)


def test_fp64_model_keeps_fp64_router_logits():
    # the replaced router computes in fp32 for bf16/fp16/fp32 models, never rounding an fp64 model to fp32
    model = _model("mixtral").double().eval()
    replace_moe_blocks(model)
    ids = torch.randint(0, VOCAB, (1, 6))
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == LAYERS and all(z.dtype == torch.float64 for z in out.router_logits)


def test_from_pretrained_with_h3fusion_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model("mixtral").eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="h3fusion").eval()
    assert loaded.config._experts_implementation == "h3fusion"
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_set_experts_implementation_round_trip(kind):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter

    eager = _model(kind)
    model = copy.deepcopy(eager)
    classes = {n: type(m) for n, m in model.named_modules()}
    assert h3fusion.set_experts_implementation(model, "h3fusion") == "h3fusion"
    assert h3fusion.current_experts_implementation(model) == "h3fusion"
    swapped = [n for n, m in model.named_modules() if type(m) is not classes[n]]
    assert len(swapped) == 2 * LAYERS  # every router and every experts module, nothing else
    ids = torch.randint(0, VOCAB, (2, 8))
    ref = _logits_and_grads(eager, ids)
    _assert_same(_logits_and_grads(model, ids), ref)
    assert h3fusion.set_experts_implementation(model, "eager") == "eager"
    assert {n: type(m) for n, m in model.named_modules()} == classes  # transformers' classes are back
    assert h3fusion.restore_moe_blocks(model) == 0
    _assert_same(_logits_and_grads(model, ids), ref)
    if kind == "mixtral":
        assert type(model.model.layers[0].mlp.experts) is MixtralExperts
        assert type(model.model.layers[0].mlp.gate) is MixtralTopKRouter


class _OddRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.top_k = 2


class _Experts(nn.Module):
    def __init__(self, **flags):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 12, 8))
        self.down_proj = nn.Parameter(torch.randn(4, 8, 6))
        self.__dict__.update(flags)


class _Block(nn.Module):
    def __init__(self, gate, experts):
        super().__init__()
        self.gate, self.experts = gate, experts


def test_refusals_name_the_problem():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    with pytest.raises(ValueError, match="router _OddRouter is not supported"):
        replace_moe_blocks(nn.Sequential(_Block(_OddRouter(), _Experts())))
    router = MixtralTopKRouter(MixtralConfig(hidden_size=8, num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(NotImplementedError, match="has_bias"):
        replace_moe_blocks(nn.Sequential(_Block(router, _Experts(has_bias=True))))
    with pytest.raises(NotImplementedError, match="is_transposed"):
        replace_moe_blocks(nn.Sequential(_Block(router, _Experts(is_transposed=True))))
    bad = _Experts()
    bad.down_proj = nn.Parameter(torch.randn(4, 8, 5))
    with pytest.raises(ValueError, match="do not match"):
        replace_moe_blocks(nn.Sequential(_Block(router, bad)))
    # a refusal leaves the model untouched
    ok, odd = _Block(copy.deepcopy(router), _Experts()), _Block(_OddRouter(), _Experts())
    with pytest.raises(ValueError):
        replace_moe_blocks(nn.Sequential(ok, odd))
    assert type(ok.gate) is MixtralTopKRouter
    assert replace_moe_blocks(nn.Sequential(nn.Linear(3, 3))) == 0


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_block_bf16_within_dtype_tolerance(kind):
    """One MoE block in bf16: the interface path and replace_moe_blocks are as close to the fp64 eager block as
    transformers' own bf16 eager block is (flash-attention rule: 2x for values, 3x for gradients)."""
    from conftest import assert_close_to_reference

    block = _model(kind).model.layers[0].mlp
    x = torch.randn(3, 7, H, dtype=torch.bfloat16)
    g = torch.randn(3, 7, H, dtype=torch.float64)
    block.to(torch.bfloat16)  # round the weights once; the fp64 copy sees the same values

    def run(dtype, mode):
        b = copy.deepcopy(block).to(dtype)
        b.experts.config = copy.copy(b.experts.config)
        b.experts.config._experts_implementation = "h3fusion" if mode == "interface" else "eager"
        if mode == "replace":
            assert replace_moe_blocks(b) == 1
        xx = x.to(dtype).requires_grad_()
        y = b(xx)
        y.backward(g.to(dtype))
        return [y, xx.grad] + [p.grad for p in b.parameters()]

    ref64, ref_lo = run(torch.float64, "eager"), run(torch.bfloat16, "eager")
    for mode in ("interface", "replace"):
        ours = run(torch.bfloat16, mode)
        for i, (a, lo, hi) in enumerate(zip(ours, ref_lo, ref64, strict=True)):
            assert_close_to_reference(a, lo, hi, factor=2 if i == 0 else 3, atol=1e-5, what=f"{kind} {mode} #{i}")


def test_lazy_registration_when_transformers_loads_later():
    """`import h3fusion` imports nothing heavy; "h3fusion" appears once transformers loads its MoE integration."""
    import os
    import subprocess
    import sys

    code = """
import sys
import h3fusion
assert "torch" not in sys.modules and "transformers.integrations.moe" not in sys.modules
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from h3fusion.models.hf_experts import h3fusion_experts_forward
assert ALL_EXPERTS_FUNCTIONS["h3fusion"] is h3fusion_experts_forward
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "python")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
