"""H3FusionTrainer: what trains, what stays frozen, that routing is learnt, and that each term is logged."""

from __future__ import annotations

import pytest
import torch
from h3fusion.data import InstructionCollator
from h3fusion.losses import gating_loss, mean_router_probs
from h3fusion.trainers import H3FusionTrainer, prepare_h3fusion_model
from training_tiny import quiet_training_args, separable_features, tiny_fused

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra OpenMP threads only spin-wait


def args_for(tmp_path, **kw):
    defaults = dict(per_device_train_batch_size=8, learning_rate=2e-2, num_train_epochs=3, logging_steps=2)
    return quiet_training_args(tmp_path, **{**defaults, **kw})


def gate_trainer(model, tmp_path, n_train, epochs, **kw):
    """An H3FusionTrainer with lambda_gate=1 on `n_train` fresh separable features (drawn after the args' seed)."""
    return H3FusionTrainer(
        model,
        args_for(tmp_path, num_train_epochs=epochs),
        train_dataset=separable_features(n_train, max_len=9),
        data_collator=InstructionCollator(0),
        lambda_gate=1.0,
        **kw,
    )


def routing_accuracy(model, feats):
    batch = InstructionCollator(0)(feats)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    pbar = mean_router_probs(out.router_logits, batch["attention_mask"])
    loss = gating_loss(out.router_logits, batch["attention_mask"], batch["category_labels"])
    return (pbar.argmax(-1) == batch["category_labels"]).float().mean().item(), loss.item()


def test_only_router_and_experts_change(tmp_path):
    model = tiny_fused()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = gate_trainer(model, tmp_path, n_train=24, epochs=1, gammas=[1e-3, 1e-2, 1e-1], lambda_balance=0.01)
    trainer.train()
    frozen = [n for n in before if not (".mlp.gate." in n or ".mlp.experts." in n)]
    assert any("self_attn" in n for n in frozen) and any("norm" in n for n in frozen)
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    after = dict(model.named_parameters())
    for n in frozen:
        assert torch.equal(after[n], before[n]), f"{n} changed"
    for n in before:
        if ".mlp.gate." in n or ".mlp.experts." in n:
            assert not torch.equal(after[n], before[n]), f"{n} did not train"


def test_gating_loss_falls_and_routing_accuracy_rises(tmp_path):
    model = tiny_fused()
    torch.nn.init.zeros_(model.model.layers[0].mlp.gate.weight)  # start from uniform routing in layer 0
    torch.nn.init.zeros_(model.model.layers[1].mlp.gate.weight)
    train, held_out = separable_features(60, max_len=9), separable_features(30, max_len=9)
    acc0, gate0 = routing_accuracy(model, held_out)
    trainer = H3FusionTrainer(
        model,
        args_for(tmp_path, num_train_epochs=4),
        train_dataset=train,
        data_collator=InstructionCollator(0),
        lambda_gate=1.0,
        gammas=1e-3,
    )
    trainer.train()
    acc1, gate1 = routing_accuracy(model, held_out)
    assert gate1 < gate0 - 0.1, (gate0, gate1)
    assert acc1 > max(acc0, 0.9), (acc0, acc1)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"lm_loss", "gate_loss", "drift_loss"} <= set(h) for h in logged)
    assert "balance_loss" not in logged[0]  # off by default
    assert logged[-1]["gate_loss"] < logged[0]["gate_loss"]


def test_total_loss_is_the_weighted_sum(tmp_path):
    model = tiny_fused()
    feats = separable_features(6, max_len=9)
    batch = InstructionCollator(0)(feats)
    trainer = H3FusionTrainer(model, args_for(tmp_path), lambda_gate=0.3, gammas=0.0, lambda_balance=0.2)
    model.train()
    loss = trainer.compute_loss(model, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 40), batch["labels"][:, 1:].reshape(-1))
    from h3fusion.losses import load_balancing_loss

    expected = lm + 0.3 * gating_loss(out.router_logits, batch["attention_mask"], batch["category_labels"])
    expected = expected + 0.2 * load_balancing_loss(out.router_logits, batch["attention_mask"], 2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the model's own aux loss is not added on top (we never pass labels to the model)
    assert model.config.router_aux_loss_coef == 0.2


def test_top_k_is_configurable(tmp_path):
    model = tiny_fused()
    H3FusionTrainer(model, args_for(tmp_path), top_k=1)
    assert model.config.num_experts_per_tok == 1
    assert all(layer.mlp.gate.top_k == 1 and layer.mlp.top_k == 1 for layer in model.model.layers)
    with pytest.raises(ValueError, match="top_k"):
        H3FusionTrainer(tiny_fused(), args_for(tmp_path), top_k=4)
    with pytest.raises(ValueError, match="gammas"):
        H3FusionTrainer(tiny_fused(), args_for(tmp_path), gammas=[1.0, 2.0])


@pytest.mark.parametrize("impl", ["h3fusion", "eager"])
def test_lora_experts_train_router_and_adapters_only(tmp_path, impl):
    # "h3fusion": our LoRAExperts (adapters inside moe_ffn); "eager": PEFT's target_parameters path
    from h3fusion.models import LoRAExperts, merge_lora_experts

    pytest.importorskip("peft")
    model = tiny_fused()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = gate_trainer(
        model, tmp_path, n_train=32, epochs=2, gammas=[0.01, 0.01, 0.01], lora_rank=2, experts_implementation=impl
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    if impl == "h3fusion":
        assert all(isinstance(layer.mlp.experts, LoRAExperts) for layer in trainer.model.model.layers)
        assert all("_lora_" in n or n.endswith(".mlp.gate.weight") for n in trainable), trainable
        assert len(trainable) == 5 * len(trainer.model.model.layers)  # router + 4 factors per layer
    else:
        assert all("lora_" in n or ("modules_to_save" in n and ".mlp.gate." in n) for n in trainable)
        assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    trainer.train()
    merged = merge_lora_experts(trainer.model) if impl == "h3fusion" else trainer.model.merge_and_unload()
    after = dict(merged.named_parameters())
    assert set(after) == set(before)
    for n, old in before.items():
        trains = ".mlp.gate." in n or ".mlp.experts." in n
        assert torch.equal(after[n], old) != trains, n
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[-1]["drift_loss"] > 0


def test_prepare_freezes_everything_else():
    model = prepare_h3fusion_model(tiny_fused())
    for n, p in model.named_parameters():
        assert p.requires_grad == (".mlp.gate." in n or ".mlp.experts." in n), n
