"""FusePOTrainer: each loss goes down on a tiny Llama in a few steps; log-probs match full logits; references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from h3fusion.data.preference import build_pairs, rloo_groups
from h3fusion.data.tokens import IGNORE_INDEX
from h3fusion.trainers.fuse_po import FusePOTrainer
from h3fusion.trainers.reference_logps import precompute_reference_logps
from h3fusion.trainers.sequence_logprobs import sequence_logprobs
from pref_tiny import pref_training_args, random_records, tiny_llama, tiny_tokenizer

LOSS_KWARGS = {
    "dpo": {"beta": 0.5},
    "dpo_norm": {"beta": 2.0},
    "simpo": {"beta": 2.0, "gamma": 0.3},
    "wrpo": {"beta": 0.5, "alpha_max": 0.6},
    "rloo": {"kl_coef": 0.05},
}


def _args(tmp_path):
    return pref_training_args(tmp_path, max_steps=8)


def _data(loss):
    records = random_records(6, per_source=2)
    if loss == "rloo":
        return rloo_groups(records, temperature=1.0)
    mode = "wrpo" if loss == "wrpo" else "per_source"
    return build_pairs(records, mode=mode, target_source="target")


@pytest.mark.parametrize("loss", list(LOSS_KWARGS))
def test_training_lowers_the_loss(loss, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    data = _data(loss)
    trainer = FusePOTrainer(
        model,
        args=_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tok,
        loss=loss,
        ref_cache_dir=str(tmp_path / "cache"),
        **LOSS_KWARGS[loss],
    )
    if loss in ("dpo", "dpo_norm", "wrpo") or LOSS_KWARGS[loss].get("kl_coef"):
        assert list((tmp_path / "cache").glob("ref_logps-*.json"))  # the reference was precomputed and cached
    if loss == "wrpo":
        alpha = trainer.current_alpha
        trainer.current_alpha = lambda: 0.6  # compare the loss at one alpha; the ramp is checked below
    before = trainer.evaluate()["eval_loss"]
    if loss in ("dpo", "dpo_norm", "wrpo"):
        # reference = the initial policy: every implicit reward is 0, the loss is log 2
        assert before == pytest.approx(math.log(2), abs=1e-5)
    if loss == "wrpo":
        trainer.current_alpha = alpha
    trainer.train()
    if loss == "wrpo":
        trainer.current_alpha = lambda: 0.6
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 1e-3, (before, after)

    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert len(logs) == 8
    keys = ["rloo/reward", "rloo/advantage_abs", "weights/mean"] if loss == "rloo" else [
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "weights/mean"
    ]  # fmt: skip
    for k in keys:
        assert all(k in h and math.isfinite(h[k]) for h in logs), k
    if loss == "wrpo":
        alphas = [h["alpha"] for h in logs]
        assert alphas[0] == 0.0 and alphas == sorted(alphas) and alphas[-1] == pytest.approx(0.6 * 7 / 8)
    if loss != "rloo":
        assert 0.0 <= logs[-1]["rewards/accuracies"] <= 1.0


def test_trainer_logps_equal_full_logits(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    data = build_pairs(random_records(3), mode="wrpo", target_source="target")
    trainer = FusePOTrainer(model, args=_args(tmp_path), train_dataset=data, processing_class=tok, loss="wrpo")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert batch["input_ids"].shape[0] == 3 * len(data)
    _, out = trainer.compute_loss(model, batch, return_outputs=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(out["logps"], (lp * (tgt != IGNORE_INDEX)).sum(-1).detach(), rtol=1e-5, atol=1e-4)


def test_online_reference_model_matches_precomputed(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    ref = tiny_llama(len(tok))  # a different reference: implicit rewards are not 0
    data = build_pairs(random_records(4), mode="per_source")
    pre = precompute_reference_logps(ref, tok, data)
    args = _args(tmp_path)
    online = FusePOTrainer(
        model, copy.deepcopy(ref), args, data, data, tok, loss="dpo", beta=0.3, precompute_ref_logps=False
    )
    assert online.ref_model is not None and not any(p.requires_grad for p in online.ref_model.parameters())
    precomputed = FusePOTrainer(model, ref, args, data, data, tok, loss="dpo", beta=0.3)
    assert "ref_chosen_logp" in precomputed.train_dataset[0]
    given = FusePOTrainer(model, None, args, pre, pre, tok, loss="dpo", beta=0.3)
    a, b, c = (t.evaluate()["eval_loss"] for t in (online, precomputed, given))
    assert a == pytest.approx(b, rel=1e-5) and b == pytest.approx(c, rel=1e-5)
    assert abs(a - math.log(2)) > 1e-4


def test_bad_arguments(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match="loss"):
        FusePOTrainer(model, args=_args(tmp_path), processing_class=tok, loss="ipo")
    with pytest.raises(ValueError, match="processing_class"):
        FusePOTrainer(model, args=_args(tmp_path), loss="dpo")
    pairs = build_pairs(random_records(2), mode="per_source")  # no target_chosen
    with pytest.raises(ValueError, match="target_chosen"):
        FusePOTrainer(model, args=_args(tmp_path), train_dataset=pairs, processing_class=tok, loss="wrpo")


@pytest.mark.parametrize("loss", ["dpo", "dpo_norm", "simpo", "wrpo"])
def test_logged_rewards_are_the_losses_rewards(loss, tmp_path):
    """The logged rewards are the implicit rewards of the loss (TRL's definitions), recomputed here from the
    batch's log-probs: beta * (policy - reference) [/ |y|], SimPO's beta * policy / |y|, WRPO's fused chosen reward."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    ref = tiny_llama(len(tok))
    data = build_pairs(random_records(4), mode="wrpo" if loss == "wrpo" else "per_source", target_source="target")
    beta = 0.7
    trainer = FusePOTrainer(model, ref, _args(tmp_path), data, None, tok, loss=loss, beta=beta, alpha_max=0.5)
    trainer.current_alpha = lambda: 0.25
    items = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(items)
    model.train()
    trainer.compute_loss(model, batch)
    p = len(items)
    with torch.no_grad():
        out = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    lp, n = out.logps.double(), out.lengths.double()
    rc = torch.tensor([it["ref_chosen_logp"] for it in items], dtype=torch.float64) if loss != "simpo" else 0
    rr = torch.tensor([it["ref_rejected_logp"] for it in items], dtype=torch.float64) if loss != "simpo" else 0
    chosen, rejected = lp[:p] - rc, lp[p : 2 * p] - rr
    if loss in ("dpo_norm", "simpo"):
        chosen, rejected = chosen / n[:p], rejected / n[p : 2 * p]
    if loss == "wrpo":
        rt = torch.tensor([it["ref_target_chosen_logp"] for it in items], dtype=torch.float64)
        chosen = 0.25 * chosen + 0.75 * (lp[2 * p :] - rt)
    logged = trainer._pref_metrics["train"]
    assert logged["rewards/chosen"][-1] == pytest.approx((beta * chosen).mean().item(), rel=1e-4, abs=1e-5)
    assert logged["rewards/rejected"][-1] == pytest.approx((beta * rejected).mean().item(), rel=1e-4, abs=1e-5)
    want_acc = (beta * chosen > beta * rejected).double().mean().item()
    assert logged["rewards/accuracies"][-1] == pytest.approx(want_acc)
