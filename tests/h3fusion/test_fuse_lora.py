"""LoRA adapters as aligned models: the fused expert = base + scaling·B·A with PEFT's scaling (alpha/r, rsLoRA's
alpha/sqrt(r), rank/alpha patterns), checked against PEFT's own merge_and_unload."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from fusion_tiny import build_tiny_llama
from h3fusion import fuse_models
from h3fusion.models.lora_merge import lora_scaling

MLP = ["gate_proj", "up_proj", "down_proj"]


def _adapter(base, path, **kw):
    """Save a real PEFT LoRA adapter with random non-zero B (init_lora_weights=False) and return PEFT's merged model."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # larger B so the delta is far above rounding
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload().eval()


def _expert(fused, layer, i, which):
    ex = fused.model.layers[layer].mlp.experts
    F = fused.config.intermediate_size
    return {"gate_proj": ex.gate_up_proj[i, :F], "up_proj": ex.gate_up_proj[i, F:], "down_proj": ex.down_proj[i]}[which]


def test_lora_experts_equal_peft_merge_with_scaling(tmp_path):
    base = build_tiny_llama(layers=2)
    merged = {
        "helpful": _adapter(base, tmp_path / "a", r=4, lora_alpha=16, target_modules=MLP),
        "harmless": _adapter(base, tmp_path / "b", r=8, lora_alpha=4, use_rslora=True, target_modules=MLP),
        "honest": _adapter(
            base,
            tmp_path / "c",
            r=4,
            lora_alpha=8,
            target_modules=MLP,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"up_proj": 3},
        ),  # fmt: skip
    }
    dirs = {"helpful": str(tmp_path / "a"), "harmless": str(tmp_path / "b"), "honest": str(tmp_path / "c")}
    fused = fuse_models(base, dirs, top_k=2, progress=False)
    for layer in range(2):
        for i, name in enumerate(dirs):
            mlp = merged[name].model.layers[layer].mlp
            for which in MLP:
                want = getattr(mlp, which).weight
                torch.testing.assert_close(_expert(fused, layer, i, which), want, rtol=1e-5, atol=1e-6)
                assert not torch.equal(want, getattr(base.model.layers[layer].mlp, which).weight)
    assert fused.config.h3fusion["sources"]["harmless"].endswith("b")


def test_alpha_not_r_scaling_is_applied(tmp_path):
    """Defect (b): with alpha != r, base + B·A (no scaling) is wrong; base + (alpha/r)·B·A is right."""
    from safetensors.torch import load_file

    base = build_tiny_llama(layers=2)
    _adapter(base, tmp_path / "x", r=4, lora_alpha=32, target_modules=["up_proj"])
    fused = fuse_models(base, {"x": str(tmp_path / "x"), "y": base}, top_k=1, progress=False)
    tensors = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj"
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    w0 = base.model.layers[1].mlp.up_proj.weight
    got = _expert(fused, 1, 0, "up_proj")
    torch.testing.assert_close(got, w0 + (32 / 4) * (b @ a), rtol=1e-5, atol=1e-6)
    assert (got - (w0 + b @ a)).abs().max() > 1e-2
    # untouched modules of an adapter expert stay the base's, and expert 1 (the base itself) is the base MLP
    assert torch.equal(_expert(fused, 1, 0, "down_proj"), base.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(_expert(fused, 1, 1, "up_proj"), w0)


def test_scaling_rule():
    assert lora_scaling({"r": 8, "lora_alpha": 16}, "model.layers.0.mlp.up_proj") == 2.0
    assert lora_scaling({"r": 16, "lora_alpha": 8, "use_rslora": True}, "m.up_proj") == pytest.approx(8 / math.sqrt(16))
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"up_proj": 4}}
    assert lora_scaling(cfg, "model.layers.3.mlp.down_proj") == 4.0
    assert lora_scaling(cfg, "model.layers.3.mlp.up_proj") == 0.5


def test_adapter_attention_with_mean(tmp_path):
    base = build_tiny_llama(layers=2)
    target = MLP + ["q_proj", "v_proj"]
    m1 = _adapter(base, tmp_path / "a", r=2, lora_alpha=6, target_modules=target)
    m2 = _adapter(base, tmp_path / "b", r=2, lora_alpha=2, target_modules=target)
    fused = fuse_models(base, {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, attention="mean", progress=False)
    for layer in range(2):
        want = (m1.model.layers[layer].self_attn.q_proj.weight + m2.model.layers[layer].self_attn.q_proj.weight) / 2
        torch.testing.assert_close(fused.model.layers[layer].self_attn.q_proj.weight, want, rtol=1e-5, atol=1e-6)


def test_unsupported_adapters_are_refused(tmp_path):
    base = build_tiny_llama(layers=2)
    _adapter(base, tmp_path / "d", r=2, lora_alpha=2, target_modules=MLP)
    cfg_path = tmp_path / "d" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DoRA"):
        fuse_models(base, {"d": str(tmp_path / "d")}, top_k=1, progress=False)
    from peft import LoraConfig, get_peft_model

    in_memory = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=MLP))
    with pytest.raises(ValueError, match="in-memory PEFT model; pass its adapter directory"):
        fuse_models(base, {"p": in_memory}, top_k=1, progress=False)
    with pytest.raises(ValueError, match="base model must be a full model"):
        fuse_models(str(tmp_path / "d"), {"d": base}, top_k=1, progress=False)


def test_adapter_changes_fusion_would_drop_are_refused(tmp_path):
    base = build_tiny_llama(layers=2)
    _adapter(base, tmp_path / "attn", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    _adapter(base, tmp_path / "both", r=2, lora_alpha=4, target_modules=[*MLP, "o_proj"])
    good = _adapter(base, tmp_path / "mlp", r=2, lora_alpha=4, target_modules=MLP)
    # attention only: the expert would be the base MLP, and the attention deltas vanish
    with pytest.raises(ValueError, match=r"expert 'x'.*changes no MLP weight.*self_attn\.q_proj"):
        fuse_models(base, {"m": str(tmp_path / "mlp"), "x": str(tmp_path / "attn")}, top_k=1, progress=False)
    with pytest.raises(ValueError, match="changes no MLP weight"):  # even when mean attention would use them
        fuse_models(base, {"x": str(tmp_path / "attn")}, top_k=1, attention="mean", progress=False)
    # MLP + attention with attention="base": the o_proj deltas are dropped
    with pytest.raises(ValueError, match=r"also changes modules outside the MLPs.*o_proj.*attention='mean'"):
        fuse_models(base, {"y": str(tmp_path / "both")}, top_k=1, progress=False)
    fuse_models(base, {"y": str(tmp_path / "both")}, top_k=1, attention="mean", progress=False)  # nothing dropped
    # explicitly allowed: a warning lists the dropped modules, and the expert is the base MLP
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.self_attn\.v_proj"):
        fused = fuse_models(
            base, {"m": str(tmp_path / "mlp"), "x": str(tmp_path / "attn")}, top_k=1, progress=False,
            allow_non_mlp_adapter=True,
        )  # fmt: skip
    for layer in range(2):
        torch.testing.assert_close(_expert(fused, layer, 1, "down_proj"), base.model.layers[layer].mlp.down_proj.weight)
        torch.testing.assert_close(_expert(fused, layer, 0, "down_proj"), good.model.layers[layer].mlp.down_proj.weight)
