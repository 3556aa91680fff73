"""LoRA expert training on our LoRAExperts (moe_ffn with lora=): the adapters saved in PEFT's target_parameters
format load with `peft.PeftModel.from_pretrained`, PEFT runs them as we do, and PEFT's merge equals ours; checkpoints
resume; the `h3fusion train --lora-rank` CLI writes the adapter and the merged model."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from h3fusion.cli import main
from h3fusion.data import InstructionCollator, InstructionExample, save_instructions
from h3fusion.models import LoRAExperts, merge_lora_experts
from h3fusion.models.lora_adapter_io import load_lora_adapter, save_lora_adapter
from h3fusion.trainers import H3FusionTrainer
from op_counts import count_h3fusion_ops, count_lora_moe_calls
from training_tiny import (
    EXPERT_NAMES,
    quiet_training_args,
    separable_features,
    tiny_fused,
    tiny_mixtral_config,
    word_level_tokenizer,
)
from transformers import AutoModelForCausalLM, MixtralForCausalLM

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 2


def _trainer(model, tmp_path, steps, **kw):
    args = dict(per_device_train_batch_size=4, learning_rate=2e-2, max_steps=steps, logging_steps=1)
    args.update(kw.pop("args", {}))
    return H3FusionTrainer(
        model,
        quiet_training_args(tmp_path, **args),
        train_dataset=kw.pop("data", None) or separable_features(4 * steps, max_len=9),
        data_collator=InstructionCollator(0),
        lambda_gate=0.5,
        gammas=0.01,
        lora_rank=2,
        lora_alpha=6.0,
        **kw,
    )


def _peft_merged(fused_dir, adapter_dir):
    fresh = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(fresh, adapter_dir)
    return loaded


def test_trained_adapter_loads_in_peft_and_merges_like_ours(tmp_path):
    model = tiny_fused()
    model.save_pretrained(tmp_path / "fused")  # the adapter's base: the fused model before training
    trainer = _trainer(model, tmp_path, steps=3)
    with count_h3fusion_ops() as counts, count_lora_moe_calls() as calls:
        trainer.train()
    assert calls["forward"] == calls["backward"] == LAYERS * 3 and counts["topk_route_backward"] == LAYERS * 3
    assert counts["moe_lora_ffn_forward"] == counts["moe_lora_ffn_backward"] == LAYERS * 3, dict(counts)
    assert counts["moe_ffn_forward"] == 0  # nothing ran the LoRA-less op on a materialised W + BA
    ours = trainer.model.eval()
    assert all(p.abs().max() > 0 for n, p in ours.named_parameters() if "lora_B" in n)  # the adapters trained
    save_lora_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "fused"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 6.0
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    ids = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        our_logits = ours(input_ids=ids).logits
    loaded = _peft_merged(tmp_path / "fused", tmp_path / "adapter")
    loaded.base_model.model.set_experts_implementation("eager")
    with torch.no_grad():
        peft_logits = loaded(input_ids=ids).logits  # PEFT's own forward: W + (alpha/r)·B·A, its factor layout
    torch.testing.assert_close(peft_logits, our_logits, rtol=1e-5, atol=1e-5)
    peft_merged = loaded.merge_and_unload()
    our_merged = merge_lora_experts(ours)
    theirs = dict(peft_merged.named_parameters())
    before = dict(tiny_fused_from(tmp_path / "fused").named_parameters())
    assert set(theirs) == set(dict(our_merged.named_parameters()))
    for name, p in our_merged.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
        changes = ".mlp.experts." in name or ".mlp.gate." in name
        assert torch.equal(p, before[name]) != changes, name
    with torch.no_grad():
        torch.testing.assert_close(our_merged(input_ids=ids).logits, our_logits, rtol=1e-5, atol=1e-5)


def tiny_fused_from(path):
    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_adapter_round_trip_and_mismatches(tmp_path):
    a = _trainer(tiny_fused(), tmp_path, steps=1).model
    for p in a.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    save_lora_adapter(a, tmp_path / "ad")
    b = copy.deepcopy(a)
    for layer in b.model.layers:
        layer.mlp.experts.reset_lora_parameters("zeros")
    load_lora_adapter(b, tmp_path / "ad")
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    other = _trainer(tiny_fused(), tmp_path, steps=1, args={"seed": 1}).model
    for layer in other.model.layers:  # another rank: refused by name
        layer.mlp.experts.rank = 3
    with pytest.raises(ValueError, match="r=2.*r=3"):
        load_lora_adapter(other, tmp_path / "ad")


def test_checkpoints_are_peft_adapters_and_resume_exactly(tmp_path):
    init, data = tiny_fused(), separable_features(16, max_len=9)
    save = {"save_strategy": "steps", "save_steps": 2}
    full = _trainer(copy.deepcopy(init), tmp_path / "a", steps=4, args=save, data=data)
    full.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()
    resumed = _trainer(copy.deepcopy(init), tmp_path / "b", steps=4, args=save, data=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    assert any(not torch.equal(p, q) for p, q in zip(full.model.parameters(), init.parameters(), strict=True))


WORDS = [f"w{i}" for i in range(30)]


def test_cli_train_lora_rank_writes_peft_adapter_and_merged_final(tmp_path):
    tok = word_level_tokenizer([":", *WORDS])
    MixtralForCausalLM(tiny_mixtral_config(h3fusion={"experts": EXPERT_NAMES})).save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    exs = [
        InstructionExample(" ".join(random.choices(WORDS[10 * (i % 3) : 10 * (i % 3) + 10], k=3)), "w1 w2", c)
        for i, c in enumerate(EXPERT_NAMES * 4)
    ]
    save_instructions(exs, tmp_path / "data.jsonl")
    out = tmp_path / "run"
    argv = ["train", str(tmp_path / "fused"), "--data", str(tmp_path / "data.jsonl"), "--out", str(out), "--no-cuda"]
    argv += ["--template", "{instruction} :", "--max-steps", "2", "--batch-size", "4", "--lr", "5e-2"]
    argv += ["--lora-rank", "2", "--save-steps", "100"]
    with count_lora_moe_calls() as calls:
        assert main(argv) == 0
    assert calls["forward"] == calls["backward"] == LAYERS * 2
    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert not any(isinstance(m, LoRAExperts) for m in final.modules())
    merged = _peft_merged(tmp_path / "fused", out / "adapter").merge_and_unload()
    theirs = dict(merged.named_parameters())
    for name, p in final.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 4.0 and config["base_model_name_or_path"].endswith("fused")


@pytest.mark.parametrize(("E", "r", "H", "F"), [(1, 1, 4, 3), (2, 3, 5, 7), (5, 2, 8, 4)])
def test_factor_layout_matches_peft_delta_weights(E, r, H, F):
    """PEFT's ParamWrapper, holding our factors in the layout we save, computes our s·B_e·A_e for every expert."""
    from h3fusion.bench.moe_bench import hf_experts
    from h3fusion.models.lora_adapter_io import from_peft_layout, to_peft_layout
    from h3fusion.models.lora_experts import FACTOR_NAMES

    ours = LoRAExperts(torch.randn(E, 2 * F, H), torch.randn(E, H, F), E, r, lora_alpha=3.0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_()
    holder = torch.nn.Module()
    holder.experts = hf_experts("eager", ours.gate_up_proj, ours.down_proj)
    config = peft.LoraConfig(
        r=r, lora_alpha=3.0, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    wrapper, seen = peft.inject_adapter_in_model(config, holder).experts, []
    while hasattr(wrapper, "parameter_name"):
        a_name, b_name = FACTOR_NAMES[wrapper.parameter_name]
        lora_a, lora_b = to_peft_layout(getattr(ours, a_name), getattr(ours, b_name))
        with torch.no_grad():
            wrapper.lora_A["default"].weight.copy_(lora_a)
            wrapper.lora_B["default"].weight.copy_(lora_b)
        delta = wrapper.get_delta_weight("default").reshape(E, *getattr(ours, wrapper.parameter_name).shape[1:])
        torch.testing.assert_close(delta, ours.delta_weight(wrapper.parameter_name), rtol=1e-5, atol=1e-5)
        back = from_peft_layout(lora_a, lora_b, E)
        assert torch.equal(back[0], getattr(ours, a_name)) and torch.equal(back[1], getattr(ours, b_name))
        seen.append(wrapper.parameter_name)
        wrapper = wrapper.base_layer
    assert seen == ["down_proj", "gate_up_proj"]  # outermost first: gate_up_proj is the inner wrapper (its keys)
