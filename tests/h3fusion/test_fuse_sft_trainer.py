"""FuseSFTTrainer: the weighted SFT loss goes down, equals the formula on full logits, and logs its metrics."""

from __future__ import annotations

import math

import pytest
import torch
from h3fusion.data.preference import sft_examples
from h3fusion.data.tokens import IGNORE_INDEX
from h3fusion.trainers.fuse_sft import FuseSFTTrainer
from pref_tiny import pref_training_args, random_records, tiny_llama, tiny_tokenizer


def _args(tmp_path):
    return pref_training_args(tmp_path, max_steps=6, logging_steps=2, gradient_accumulation_steps=2)


@pytest.mark.parametrize("reduction", ["token_mean", "sum"])
def test_fuse_sft_lowers_loss_and_logs(reduction, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    data = sft_examples(random_records(4), top_k=3, temperature=0.5)
    trainer = FuseSFTTrainer(
        model, _args(tmp_path), data, data, tok, reduction=reduction, max_length=24, max_prompt_length=10
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 1e-3, (before, after)
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert len(logs) == 3
    for k in ("sft/logp_per_token", "sft/weight", "sft/tokens"):
        assert all(k in h and math.isfinite(h[k]) for h in logs), k
    assert "eval_sft/logp_per_token" in trainer.state.log_history[-1]


def test_fuse_sft_loss_equals_weighted_formula_on_full_logits(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    data = sft_examples(random_records(3), top_k=2, temperature=1.0)
    trainer = FuseSFTTrainer(model, _args(tmp_path), data, None, tok)
    batch = trainer.data_collator(data)
    loss = trainer.compute_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    tgt = batch["labels"][:, 1:]
    mask = tgt != IGNORE_INDEX
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    per = -(lp * mask).sum(-1) / mask.sum(-1)
    w = torch.tensor([d["weight"] for d in data])
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)  # normalised over the dataset
    torch.testing.assert_close(loss, (w * per).mean(), rtol=1e-5, atol=1e-5)  # the plain batch mean of w * l
