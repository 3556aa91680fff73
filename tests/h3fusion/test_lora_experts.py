"""LoRAExperts: per-expert LoRA experts on moe_ffn(..., lora=...), per-expert or shared base, as a drop-in for
transformers' MixtralExperts inside the Mixtral block; the hf_experts entry points see them or refuse clearly."""

from __future__ import annotations

import pytest
import torch
from h3fusion.models import (
    LoRAExperts,
    current_experts_implementation,
    merge_lora_experts,
    replace_moe_blocks,
    set_experts_implementation,
)
from h3fusion.models.hf_experts import check_block
from h3fusion.models.lora_experts import FACTOR_NAMES, add_lora_experts
from op_counts import count_h3fusion_ops, count_lora_moe_calls
from training_tiny import tiny_fused

import h3fusion_ext

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_factors(module: LoRAExperts, std: float = 0.3) -> None:
    with torch.no_grad():
        for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
            getattr(module, name).normal_(0.0, std)


def _expected(x, weights, experts, module: LoRAExperts):
    """The oracle: materialise W_e + s·B_e·A_e with plain torch, then the reference expert loop."""
    E = module.num_experts
    gate_up = module.gate_up_proj.expand(E, -1, -1) + module.scaling * module.gate_up_lora_B @ module.gate_up_lora_A
    down = module.down_proj.expand(E, -1, -1) + module.scaling * module.down_lora_B @ module.down_lora_A
    return h3fusion_ext.reference.moe_ffn(x, weights, experts, gate_up, down)


@pytest.mark.parametrize("shared", [False, True])
def test_forward_and_gradients_equal_the_materialised_experts(shared):
    # fp64: the LoRA detour and the materialised weights sum in different orders, so fp32 would only agree to a
    # few ulps of the intermediate sums; in fp64 any real difference stands out at these tolerances
    E, H, F, T, k, r = 4, 8, 12, 10, 2, 3
    base = 1 if shared else E
    f64 = dict(dtype=torch.float64)
    module = LoRAExperts(
        torch.randn(base, 2 * F, H, **f64) * 0.2, torch.randn(base, H, F, **f64) * 0.2, E, r, lora_alpha=5.0
    )
    _random_factors(module)
    assert module.gate_up_lora_A.dtype == torch.float64
    assert module.shared_base == shared and module.scaling == pytest.approx(5.0 / 3)
    assert not module.gate_up_proj.requires_grad  # a plain tensor becomes a frozen base
    x = torch.randn(T, H, **f64, requires_grad=True)
    weights = torch.softmax(torch.randn(T, k, **f64), -1).requires_grad_()
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    got = module(x, experts.long(), weights)  # transformers passes int64 ids
    want = _expected(x, weights, experts, module)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [x, weights, *(p for p in module.parameters() if p.requires_grad)]
    assert len(params) == 6
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the base can train too when asked
    module.gate_up_proj.requires_grad_(True)
    (gb,) = torch.autograd.grad(module(x, experts, weights).sum(), [module.gate_up_proj])
    (wb,) = torch.autograd.grad(_expected(x, weights, experts, module).sum(), [module.gate_up_proj])
    torch.testing.assert_close(gb, wb, rtol=1e-5, atol=1e-6)


def test_peft_style_init_starts_at_the_base_and_norms_match_the_product():
    E, H, F, r = 3, 8, 6, 2
    module = LoRAExperts(torch.randn(E, 2 * F, H), torch.randn(E, H, F), E, r)
    assert module.lora_alpha == 2 * r and module.scaling == 2.0  # default alpha = 2r, as prepare_h3fusion_model
    assert module.gate_up_lora_B.abs().max() == 0 and module.down_lora_B.abs().max() == 0
    assert 0 < module.gate_up_lora_A.abs().max() <= 1 / H**0.5  # PEFT's kaiming-uniform bound 1/sqrt(in)
    assert 0 < module.down_lora_A.abs().max() <= 1 / F**0.5
    gu, dp = module.merged_weights()
    assert torch.equal(gu, module.gate_up_proj) and torch.equal(dp, module.down_proj)
    _random_factors(module)
    for projection in ("gate_up_proj", "down_proj"):
        want = module.delta_weight(projection).pow(2).sum(dim=(1, 2))
        torch.testing.assert_close(module.delta_squared_norms(projection), want, rtol=1e-5, atol=1e-6)


def test_fp64_experts_merge_and_norm_in_fp64():
    # an fp64 base (the tests' exact oracle) must never be rounded to fp32 on the way through merged_weights
    E, H, F, r = 2, 8, 6, 2
    module = LoRAExperts(torch.randn(E, 2 * F, H), torch.randn(E, H, F), E, r).double()
    gu, dp = module.merged_weights()
    assert gu.dtype == torch.float64 and torch.equal(gu, module.gate_up_proj) and torch.equal(dp, module.down_proj)
    _random_factors(module)
    for projection in ("gate_up_proj", "down_proj"):
        delta = module.delta_weight(projection)
        assert delta.dtype == torch.float64
        want = torch.bmm(getattr(module, FACTOR_NAMES[projection][1]), getattr(module, FACTOR_NAMES[projection][0]))
        torch.testing.assert_close(delta, want * module.scaling, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(module.delta_squared_norms(projection), delta.pow(2).sum(dim=(1, 2)), rtol=1e-12,
                                   atol=1e-13)  # fmt: skip


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="down_proj"):
        LoRAExperts(torch.randn(2, 8, 4), torch.randn(2, 4, 5), 2, 1)
    with pytest.raises(ValueError, match="num_experts=3"):
        LoRAExperts(torch.randn(2, 8, 4), torch.randn(2, 4, 4), 3, 1)
    with pytest.raises(ValueError, match="rank"):
        LoRAExperts(torch.randn(1, 8, 4), torch.randn(1, 4, 4), 3, 0)
    with pytest.raises(ValueError, match="3-D"):
        LoRAExperts(torch.randn(8, 4), torch.randn(4, 4), 1, 1)


def test_drop_in_for_mixtral_experts_and_hf_entry_points():
    model = tiny_fused().eval()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        without_lora = model(input_ids=ids).logits
    assert add_lora_experts(model, rank=2, lora_alpha=3.0) == 2
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, LoRAExperts)
        _random_factors(layer.mlp.experts)
        check_block(layer.mlp)
    with torch.no_grad(), count_lora_moe_calls() as calls:
        ours = model(input_ids=ids).logits
    assert calls["forward"] == 2
    assert current_experts_implementation(model) == "h3fusion"
    # routers onto topk_route; the LoRA experts stay as they are (not swapped for the LoRA-less experts forward)
    assert replace_moe_blocks(model) == 2
    assert all(type(layer.mlp.experts) is LoRAExperts for layer in model.model.layers)
    with torch.no_grad(), count_h3fusion_ops() as counts, count_lora_moe_calls() as calls:
        routed = model(input_ids=ids).logits
    assert counts["topk_route"] == calls["forward"] == 2
    torch.testing.assert_close(routed, ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="LoRA experts.*merge_lora_experts"):
        set_experts_implementation(model, "eager")
    with pytest.raises(ValueError, match="already has LoRA experts"):
        add_lora_experts(model, rank=2)
    # folding the adapters in gives back transformers' experts with W + sBA: same function under "eager"
    merge_lora_experts(model)
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())
    assert set_experts_implementation(model, "eager") == "eager"
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)
    assert (merged - without_lora).abs().max() > 1e-3  # the adapters matter


def test_router_expert_count_mismatch_is_refused():
    model = tiny_fused()
    block = model.model.layers[0].mlp
    experts = block.experts
    block.experts = LoRAExperts(experts.gate_up_proj[:1].detach(), experts.down_proj[:1].detach(), 4, 2)
    with pytest.raises(ValueError, match="router has 3 experts, its LoRA experts 4"):
        check_block(block)
    block.experts = LoRAExperts(experts.gate_up_proj[:1].detach(), experts.down_proj[:1].detach(), 3, 2)
    check_block(block)  # a shared base [1, ...] for 3 experts is fine


def test_expert_parallelism_refuses_lora_experts(tmp_path):
    import torch.distributed as dist
    from h3fusion.parallel import convert_to_expert_parallel

    model = tiny_fused()
    add_lora_experts(model, rank=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="LoRA experts.*cannot be made expert-parallel"):
            convert_to_expert_parallel(model)
    finally:
        dist.destroy_process_group()
    assert all(isinstance(layer.mlp.experts, LoRAExperts) for layer in model.model.layers)  # nothing changed


def test_save_fused_model_refuses_unmerged_per_expert_lora(tmp_path):
    from h3fusion.models import save_fused_model

    model = tiny_fused()
    add_lora_experts(model, rank=2)
    with pytest.raises(ValueError, match="merge_lora_experts.*save_lora_adapter"):
        save_fused_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_fused_model(merge_lora_experts(model), tmp_path / "out")  # merged: a plain checkpoint
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu"])
def test_lora_experts_keep_a_geglu_models_activation(hidden_act):
    from training_tiny import tiny_mixtral_config
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM(tiny_mixtral_config(hidden_act=hidden_act)).eval()
    ids = torch.randint(0, 40, (2, 7))
    add_lora_experts(model, rank=2)
    want = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}[hidden_act]
    for layer in model.model.layers:
        assert layer.mlp.experts.moe_ffn_activation == want
        _random_factors(layer.mlp.experts)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        merge_lora_experts(model)
        model.set_experts_implementation("eager")
        eager = model(input_ids=ids).logits  # transformers' own GeGLU experts on W + sBA
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
