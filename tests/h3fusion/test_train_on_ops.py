"""H3Fusion training runs on the h3fusion_ext ops: every MoE block through `topk_route` + `moe_ffn` and the LM loss
through `linear_logprob` (no [B, S, V] logits), counted at the dispatcher during real `train()` runs (full and LoRA
experts, the `h3fusion train` CLI), with the loss equal to the logits path in value and gradients."""

from __future__ import annotations

import json
import random

import pytest
import torch
from h3fusion.cli import main
from h3fusion.data import InstructionCollator, InstructionExample, save_instructions
from h3fusion.losses import causal_lm_loss, gating_loss, lm_loss_from_hidden, load_balancing_loss
from h3fusion.models import (
    EXPERTS_IMPLEMENTATIONS,
    LoRAExperts,
    current_experts_implementation,
    restore_moe_blocks,
    set_experts_implementation,
)
from h3fusion.trainers import H3FusionTrainer, prepare_h3fusion_model
from op_counts import count_h3fusion_ops, count_lora_moe_calls
from training_tiny import (
    EXPERT_NAMES,
    quiet_training_args,
    separable_features,
    tiny_fused,
    tiny_mixtral_config,
    word_level_tokenizer,
)
from transformers import MixtralForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra OpenMP threads only spin-wait

LAYERS = 2  # tiny_fused's MoE layers
WORDS = [f"w{i}" for i in range(30)]


def _args(tmp_path, steps, **kw):
    defaults = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=steps, logging_steps=1)
    return quiet_training_args(tmp_path, **{**defaults, **kw})


def _randomize_lora_b(model):
    # PEFT starts B at 0 (BA = 0): make the adapters matter, so a path that dropped them would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)


def _labels_with_gaps(b, s, v):
    labels = torch.randint(0, v, (b, s))
    labels[:, :2] = -100  # prompt
    labels[1, s // 2 :] = -100  # padding
    labels[2, :] = -100  # an example without a response
    return labels


# ---- the loss from hidden states equals the loss from logits ---------------------------------------------------


def test_lm_loss_from_hidden_equals_logits_path_fp32():
    hidden = torch.randn(4, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = _labels_with_gaps(4, 11, 50)
    ours = lm_loss_from_hidden(hidden, weight, labels)
    ref = causal_lm_loss(hidden @ weight.T, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # positions whose next token is unlabelled get no gradient (the last one, the prompt, the empty example)
    assert g_ours[0][:, -1].abs().max() == 0 and g_ours[0][2].abs().max() == 0 and g_ours[0][:, 0].abs().max() == 0


def test_lm_loss_from_hidden_is_exact_in_fp64():
    hidden = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    labels = _labels_with_gaps(3, 7, 13)
    ours = lm_loss_from_hidden(hidden, weight, labels)
    logits = (hidden @ weight.T)[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_lm_loss_from_hidden_bf16_within_dtype_tolerance():
    from conftest import assert_close_to_reference

    hidden = torch.randn(4, 10, 32).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(64, 32) * 0.3).to(torch.bfloat16).requires_grad_()
    labels = _labels_with_gaps(4, 10, 64)

    def run(fn, dtype):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        loss = fn(h, w)
        return [loss, *torch.autograd.grad(loss, (h, w))]

    ours = run(lambda h, w: lm_loss_from_hidden(h, w, labels), torch.bfloat16)
    lowp = run(lambda h, w: causal_lm_loss(h @ w.T, labels), torch.bfloat16)  # transformers' path in bf16
    ref = run(lambda h, w: causal_lm_loss((h @ w.T).double(), labels), torch.float64)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    for i, (a, lo, hi) in enumerate(zip(ours, lowp, ref, strict=True)):
        assert_close_to_reference(a, lo, hi, factor=2 if i == 0 else 3, atol=1e-5, what=f"output #{i}")


def test_lm_loss_from_hidden_without_labels_and_bad_shapes():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    loss = lm_loss_from_hidden(hidden, weight, torch.full((2, 5), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().max() == 0
    with pytest.raises(ValueError, match="hidden"):
        lm_loss_from_hidden(hidden[0], weight, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        lm_loss_from_hidden(hidden, weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        lm_loss_from_hidden(hidden, torch.randn(9, 5), torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_compute_loss_equals_the_logits_path_in_value_and_gradients(tmp_path, lora_rank):
    trainer = H3FusionTrainer(
        tiny_fused(), _args(tmp_path, 1), lambda_gate=0.3, gammas=0.0, lambda_balance=0.2, lora_rank=lora_rank
    )
    model = trainer.model.train()
    if lora_rank:
        _randomize_lora_b(model)
    batch = InstructionCollator(0)(separable_features(6, max_len=9))
    params = [p for p in model.parameters() if p.requires_grad]
    with count_h3fusion_ops() as counts, count_lora_moe_calls() as lora_calls:
        loss = trainer.compute_loss(model, batch)
        grads = torch.autograd.grad(loss, params)
    assert counts["linear_logprob_forward"] == 1 and counts["topk_route"] == LAYERS
    if lora_rank:  # LoRAExperts: moe_ffn(..., lora=...) in forward and backward, on the LoRA kernels
        assert lora_calls["forward"] == lora_calls["backward"] == LAYERS, dict(lora_calls)
        assert counts["moe_lora_ffn_forward"] == counts["moe_lora_ffn_backward"] == LAYERS, dict(counts)
    else:
        assert counts["moe_ffn_forward"] == LAYERS and not lora_calls

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    mask, cats = batch["attention_mask"], batch["category_labels"]
    ref = causal_lm_loss(out.logits, batch["labels"]) + 0.3 * gating_loss(out.router_logits, mask, cats)
    ref = ref + 0.2 * load_balancing_loss(out.router_logits, mask, 2)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for p, g, r in zip(params, grads, torch.autograd.grad(ref, params), strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=lambda m, p=p: f"{p.shape}: {m}")


def test_sharded_parameters_take_the_logits_path(tmp_path, monkeypatch):
    # FSDP / ZeRO-3 gather the lm_head weight only inside the model's forward: the loss must not read it outside
    trainer = H3FusionTrainer(tiny_fused(), _args(tmp_path, 1), lambda_gate=0.3, gammas=0.0)
    model = trainer.model.train()
    batch = InstructionCollator(0)(separable_features(6, max_len=9))
    expected = trainer.compute_loss(model, batch)
    monkeypatch.setattr(trainer, "_params_sharded", lambda: True)
    with count_h3fusion_ops() as counts:
        loss = trainer.compute_loss(model, batch)
    assert counts["linear_logprob_forward"] == 0 and counts["moe_ffn_forward"] == LAYERS
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


# ---- real train() runs, counted ----------------------------------------------------------------------------------


def _count_training(tmp_path, steps, **kw):
    model = tiny_fused()
    projected = []  # positions the lm_head projects per call: 0 means no logits were built
    model.lm_head.register_forward_hook(lambda _m, inputs, _out: projected.append(inputs[0].shape[-2]))
    trainer = H3FusionTrainer(
        model,
        _args(tmp_path, steps, **kw.pop("args", {})),
        train_dataset=separable_features(4 * steps, max_len=9),
        data_collator=InstructionCollator(0),
        lambda_gate=0.5,
        gammas=0.01,
        **kw,
    )
    with count_h3fusion_ops() as counts, count_lora_moe_calls() as lora_calls:
        trainer.train()
    assert projected == [0] * steps
    counts.update({f"lora_moe_ffn_{k}": v for k, v in lora_calls.items()})
    return trainer, counts


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_train_runs_every_moe_block_and_the_lm_loss_on_our_ops(tmp_path, lora_rank):
    steps = 3
    trainer, counts = _count_training(tmp_path, steps, lora_rank=lora_rank)
    assert trainer.experts_implementation == "h3fusion"
    per_layer = LAYERS * steps
    moe = ("moe_ffn_forward", "moe_ffn_backward")
    if lora_rank:  # through the public API (lora=...) down to the LoRA kernels, forward and backward
        moe = ("lora_moe_ffn_forward", "lora_moe_ffn_backward", "moe_lora_ffn_forward", "moe_lora_ffn_backward")
    for op in ("topk_route", "topk_route_backward", *moe):
        assert counts[op] == per_layer, (op, dict(counts))
    assert counts["linear_logprob_forward"] == counts["linear_logprob_backward"] == steps, dict(counts)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps and all({"lm_loss", "gate_loss", "drift_loss"} <= set(h) for h in logged)
    assert logged[-1]["drift_loss"] > 0  # the experts moved (through moe_ffn's weight gradients)
    if lora_rank:
        assert all(isinstance(layer.mlp.experts, LoRAExperts) for layer in trainer.model.model.layers)
        lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 2 * LAYERS and all(p.abs().max() > 0 for p in lora_b)  # B starts at 0: backward got it


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_bf16_training_runs_on_our_ops(tmp_path, lora_rank):
    steps = 2
    model = tiny_fused().to(torch.bfloat16)
    trainer = H3FusionTrainer(
        model,
        _args(tmp_path, steps, bf16=True),
        train_dataset=separable_features(4 * steps, max_len=9),
        data_collator=InstructionCollator(0),
        lambda_gate=0.5,
        gammas=0.01,
        lora_rank=lora_rank,
    )
    with count_h3fusion_ops() as counts, count_lora_moe_calls() as lora_calls:
        trainer.train()
    moe_backward = counts["moe_lora_ffn_backward"] if lora_rank else counts["moe_ffn_backward"]
    assert moe_backward == counts["topk_route_backward"] == LAYERS * steps, (dict(counts), dict(lora_calls))
    assert lora_calls["backward"] == (LAYERS * steps if lora_rank else 0)
    assert counts["linear_logprob_backward"] == steps
    logged = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert len(logged) == steps and all(0 < h["lm_loss"] < 10 and 0 < h["gate_loss"] < 10 for h in logged)


def test_gradient_checkpointing_recomputes_on_our_ops(tmp_path):
    steps = 2
    trainer, counts = _count_training(tmp_path, steps, args={"gradient_checkpointing": True})
    assert counts["moe_ffn_forward"] == 2 * LAYERS * steps  # forward, then the recomputation in backward
    assert counts["moe_ffn_backward"] == LAYERS * steps
    assert trainer.state.log_history[-1]["train_loss"] > 0


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_transformers_implementations_run_none_of_our_moe_ops(tmp_path, impl):
    steps = 2
    trainer, counts = _count_training(tmp_path, steps, experts_implementation=impl)
    assert trainer.experts_implementation == impl == trainer.model.config._experts_implementation
    assert counts["moe_ffn_forward"] == counts["moe_ffn_backward"] == counts["topk_route"] == 0, dict(counts)
    assert counts["linear_logprob_forward"] == steps  # the LM loss stays on linear_logprob


# ---- choosing and switching the implementation -----------------------------------------------------------------


def test_switching_implementations_keeps_the_function_with_peft_lora_experts():
    model = prepare_h3fusion_model(tiny_fused(), lora_rank=2, experts_implementation="eager")  # PEFT's path
    assert current_experts_implementation(model) == "eager"
    assert set_experts_implementation(model, "h3fusion") == "h3fusion"
    _randomize_lora_b(model)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        with count_h3fusion_ops() as counts:
            ours = model(input_ids=ids).logits
        assert counts["moe_ffn_forward"] == counts["topk_route"] == LAYERS
        assert set_experts_implementation(model, "eager") == "eager"
        with count_h3fusion_ops() as counts:
            eager = model(input_ids=ids).logits
        assert counts["moe_ffn_forward"] == 0
        with model.disable_adapter():
            no_lora = model(input_ids=ids).logits
        assert set_experts_implementation(model, "h3fusion") == "h3fusion"
        again = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        restore_moe_blocks(merged)
        merged.set_experts_implementation("eager")
        merged_out = merged(input_ids=ids).logits
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, merged_out, rtol=1e-4, atol=1e-5)  # our kernels saw W + BA
    assert torch.equal(ours, again)
    assert (ours - no_lora).abs().max() > 1e-3  # the adapters matter


def test_bad_implementation_is_refused():
    with pytest.raises(ValueError, match="experts_implementation.*'fast'"):
        set_experts_implementation(tiny_fused(), "fast")
    from h3fusion.cli import common

    assert common.EXPERTS_IMPLEMENTATIONS == EXPERTS_IMPLEMENTATIONS


# ---- the CLI -----------------------------------------------------------------------------------------------------


def _cli_setup(tmp_path):
    tok = word_level_tokenizer([":", *WORDS])
    MixtralForCausalLM(tiny_mixtral_config(h3fusion={"experts": EXPERT_NAMES})).save_pretrained(tmp_path / "fused")
    tok.save_pretrained(tmp_path / "fused")
    exs = []
    for i in range(12):
        cat = EXPERT_NAMES[i % 3]
        offset = 10 * (i % 3)
        prompt = " ".join(random.choices(WORDS[offset : offset + 10], k=random.randint(2, 5)))
        exs.append(InstructionExample(prompt, " ".join(random.choices(WORDS, k=random.randint(1, 4))), cat))
    save_instructions(exs, tmp_path / "data.jsonl")


@pytest.mark.parametrize("impl", ["h3fusion", "grouped_mm"])
def test_cli_train_runs_our_ops_and_its_loss_equals_the_logits_path(tmp_path, monkeypatch, impl):
    import h3fusion.trainers.h3fusion_trainer as trainer_module

    _cli_setup(tmp_path)
    pairs = []

    def spy(hidden, weight, labels):
        loss = lm_loss_from_hidden(hidden, weight, labels)
        with torch.no_grad():
            pairs.append((loss.detach(), causal_lm_loss(hidden @ weight.T, labels)))
        return loss

    monkeypatch.setattr(trainer_module, "lm_loss_from_hidden", spy)
    steps, out = 2, tmp_path / "run"
    argv = ["train", str(tmp_path / "fused"), "--data", str(tmp_path / "data.jsonl"), "--out", str(out)]
    argv += ["--template", "{instruction} :", "--max-steps", str(steps), "--logging-steps", "1", "--batch-size", "4"]
    argv += ["--lr", "1e-2", "--save-steps", "100", "--seed", str(random.randint(0, 10_000)), "--no-cuda"]
    if impl != "h3fusion":  # the default is ours
        argv += ["--experts-implementation", impl]
    with count_h3fusion_ops() as counts:
        assert main(argv) == 0
    ours = impl == "h3fusion"
    assert counts["moe_ffn_forward"] == counts["moe_ffn_backward"] == (LAYERS * steps if ours else 0), dict(counts)
    assert counts["topk_route"] == (LAYERS * steps if ours else 0)
    assert counts["linear_logprob_forward"] == counts["linear_logprob_backward"] == steps
    assert len(pairs) == steps
    for loss, logits_path in pairs:
        torch.testing.assert_close(loss, logits_path, rtol=1e-6, atol=1e-6)
    log = [h for h in json.loads((out / "train_log.json").read_text()) if "lm_loss" in h]
    assert [h["lm_loss"] for h in log] == pytest.approx([p[0].item() for p in pairs], abs=2e-6)
    config = json.loads((out / "run_config.json").read_text())
    assert config["experts_implementation"] == impl and config["max_steps"] == steps


@pytest.mark.parametrize("impl", ["h3fusion", "eager"])
def test_cli_route_report_records_and_uses_the_implementation(tmp_path, impl):
    _cli_setup(tmp_path)
    argv = ["route-report", str(tmp_path / "fused"), "--data", str(tmp_path / "data.jsonl"), "--out"]
    argv += [str(tmp_path / "report"), "--device", "cpu", "--batch-size", "12", "--experts-implementation", impl]
    with count_h3fusion_ops() as counts:
        assert main(argv) == 0
    assert counts["topk_route"] == counts["moe_ffn_forward"] == (LAYERS if impl == "h3fusion" else 0)
    report = json.loads((tmp_path / "report" / "route_report.json").read_text())
    assert report["experts_implementation"] == impl
