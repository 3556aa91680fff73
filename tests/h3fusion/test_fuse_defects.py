"""design.md §3 defects of the paper's public code that concern fusion, one test each: (a) all experts aliased to one
tensor that accumulates every adapter delta, (b) LoRA alpha/r scaling omitted, (h) 32 layers / 3 experts / top-2
hard-coded."""

from __future__ import annotations

import copy

import pytest
import torch
from fusion_tiny import build_tiny_llama, perturbed_copy
from h3fusion import fuse_models


def _lora_dir(base, path, r, alpha):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    m.save_pretrained(path)
    return str(path)


def test_defect_a_experts_are_distinct_and_independent(tmp_path):
    """Each expert holds only its own adapter's delta (not the sum of all), in storage of its own."""
    base = build_tiny_llama(layers=2)
    dirs = {n: _lora_dir(base, tmp_path / n, r=2, alpha=2) for n in ("h", "s", "t")}
    fused = fuse_models(base, dirs, progress=False)
    ex = fused.model.layers[0].mlp.experts
    w0 = base.model.layers[0].mlp.down_proj.weight
    deltas = [ex.down_proj[i] - w0 for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(ex.down_proj[i], ex.down_proj[j])
        # the aliasing bug would give every expert base + sum of all deltas
        assert (ex.down_proj[i] - (w0 + sum(deltas))).abs().max() > 1e-3
    # writing to one expert changes no other expert and no input model
    before = [ex.down_proj[i].clone() for i in range(3)]
    w0_before = w0.clone()
    with torch.no_grad():
        ex.down_proj[1].add_(1.0)
    assert torch.equal(ex.down_proj[0], before[0]) and torch.equal(ex.down_proj[2], before[2])
    assert torch.equal(base.model.layers[0].mlp.down_proj.weight, w0_before)


def test_defect_a_full_models_do_not_share_storage():
    base = build_tiny_llama(layers=2)
    aligned = {n: perturbed_copy(base) for n in ("h", "s")}
    fused = fuse_models(base, aligned, top_k=1, progress=False)
    src = aligned["h"].model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        src.add_(1.0)
    assert not torch.equal(fused.model.layers[1].mlp.experts.down_proj[0], src)


def test_defect_b_lora_scaling(tmp_path):
    base = build_tiny_llama(layers=2)
    fused = fuse_models(base, {"x": _lora_dir(base, tmp_path / "x", r=2, alpha=10), "y": base}, progress=False)
    fused_unit = fuse_models(base, {"x": _lora_dir(base, tmp_path / "u", r=2, alpha=2), "y": base}, progress=False)
    w0 = base.model.layers[0].mlp.down_proj.weight
    d = fused.model.layers[0].mlp.experts.down_proj[0] - w0
    # alpha/r = 5: the delta must be five times a unit-scaled B·A of the same magnitude, not 1x
    ratio = d.norm() / (fused_unit.model.layers[0].mlp.experts.down_proj[0] - w0).norm()
    assert 2.5 < ratio < 10


@pytest.mark.parametrize("n_experts,top_k", [(2, 1), (4, 3), (4, 1)])
def test_defect_h_any_layers_experts_and_top_k(n_experts, top_k):
    base = build_tiny_llama(layers=3)
    aligned = {f"e{i}": perturbed_copy(base) for i in range(n_experts)}
    fused = fuse_models(base, aligned, top_k=top_k, progress=False)
    cfg = fused.config
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (3, n_experts, top_k)
    assert len(fused.model.layers) == 3
    for layer_idx, layer in enumerate(fused.model.layers):
        assert layer.mlp.experts.gate_up_proj.shape[0] == n_experts
        assert layer.mlp.gate.weight.shape == (n_experts, cfg.hidden_size)
        last = aligned[f"e{n_experts - 1}"].model.layers[layer_idx].mlp.down_proj.weight
        assert torch.equal(layer.mlp.experts.down_proj[n_experts - 1], last)
    out = fused(torch.randint(3, cfg.vocab_size, (2, 5)), output_router_logits=True)
    assert out.logits.shape == (2, 5, cfg.vocab_size)
    assert len(out.router_logits) == 3 and out.router_logits[0].shape[-1] == n_experts
