"""The training defects of the original H3Fusion code (design.md §3 (c)-(g)), each shown absent in ours."""

from __future__ import annotations

import pytest
import torch
from h3fusion.data import InstructionCollator, InstructionDataset, InstructionExample
from h3fusion.losses import gating_loss
from h3fusion.trainers import H3FusionTrainer
from training_tiny import separable_features, tiny_fused, word_level_tokenizer
from transformers import TrainingArguments

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra OpenMP threads only spin-wait


def train(model, tmp_path, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        learning_rate=1e-2,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = H3FusionTrainer(
        model,
        args,
        train_dataset=separable_features(18),
        data_collator=InstructionCollator(0),
        lambda_gate=1.0,
        gammas=1e-3,
        **kw,
    )
    trainer.train()
    return trainer


def test_c_router_actually_trains(tmp_path):
    model = tiny_fused()
    routers = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    train(model, tmp_path)
    for layer, before in zip(model.model.layers, routers, strict=True):
        assert layer.mlp.gate.weight.requires_grad
        assert not torch.equal(layer.mlp.gate.weight, before)


def test_d_attention_not_trained_full_or_lora(tmp_path):
    for lora_rank in (None, 2):
        model = tiny_fused()
        attn = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" in n}
        trainer = train(model, tmp_path / str(lora_rank), lora_rank=lora_rank)
        # no adapter or trainable parameter anywhere in attention
        assert not [n for n, p in trainer.model.named_parameters() if "self_attn" in n and p.requires_grad]
        assert not [n for n, _ in trainer.model.named_parameters() if "self_attn" in n and "lora_" in n]
        now = {n: p for n, p in model.named_parameters() if "self_attn" in n}
        for n, before in attn.items():
            key = n if n in now else next(k for k in now if k.endswith(n.split("model.", 1)[-1]))
            assert torch.equal(now[key], before), n


def test_e_no_double_softmax_gradient_is_analytic():
    # d/dz of -log(mean_t softmax(z_t)[y]) for one token: softmax(z) - onehot(y). A CrossEntropy on probabilities
    # (the original code) would give the Jacobian of a second softmax instead.
    z = torch.randn(1, 4, dtype=torch.float32, requires_grad=True)
    y = int(torch.randint(0, 4, ()))
    gating_loss([z], torch.ones(1, 1), torch.tensor([y])).backward()
    expected = torch.softmax(z.detach(), -1) - torch.nn.functional.one_hot(torch.tensor([y]), 4)
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-6)
    wrong = torch.nn.functional.cross_entropy(torch.softmax(z.detach(), -1), torch.tensor([y]))
    ours = gating_loss([z.detach()], torch.ones(1, 1), torch.tensor([y]))
    assert abs(wrong.item() - ours.item()) > 1e-3


def test_f_category_labels_follow_expert_names(tmp_path):
    # The original code built labels from a cumulative list of dataset sizes, so one category got the wrong id.
    # Here the fused model's expert order differs from the data's order and a category is absent from the data.
    model = tiny_fused(names=("honest", "helpful", "harmless"))
    data = [
        InstructionExample("a", "b", "helpful"),
        InstructionExample("b", "c", "harmless"),
        InstructionExample("c", "a", "helpful"),
    ] * 2
    trainer = H3FusionTrainer(model, TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    ds = InstructionDataset(
        data, word_level_tokenizer(["a", "b", "c"]), trainer.expert_names, template="{instruction} :"
    )
    assert [f["category_labels"] for f in ds] == [1, 2, 1] * 2
    assert trainer.expert_names == ["honest", "helpful", "harmless"]


def test_g_padding_not_averaged_into_router_probs():
    model = tiny_fused().eval()
    examples = [torch.randint(1, 40, (n,)) for n in (7, 3, 5)]
    labels = torch.tensor([0, 2, 1])
    batch = InstructionCollator(0)([{"input_ids": e.tolist(), "category_labels": 0} for e in examples])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        padded = gating_loss(out.router_logits, batch["attention_mask"], labels)
        alone = []
        for e, y in zip(examples, labels, strict=True):
            o = model(input_ids=e[None], output_router_logits=True)
            alone.append(gating_loss(o.router_logits, torch.ones(1, len(e)), y[None]))
    # right padding + causal attention: real tokens' router logits are the same as without padding
    torch.testing.assert_close(padded, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)
    # averaging over padding too (the original code) would give a different value
    naive = -torch.log(
        torch.stack([torch.softmax(z.float(), -1).view(3, -1, 3) for z in out.router_logits])
        .mean(dim=(0, 2))
        .gather(1, labels[:, None])
    ).mean()
    assert abs(naive.item() - padded.item()) > 1e-4
