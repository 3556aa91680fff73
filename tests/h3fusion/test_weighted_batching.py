"""The weighted-loss contract through the trainers: dataset-normalised weights and the plain batch mean of w * l.

The gradient averaged over the minibatches of an epoch equals the full-batch gradient at every batch size; the
temperature of the weights changes training at batch size 1; tiny temperatures never kill a run.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from h3fusion.data.preference import build_pairs, normalize_weights, rloo_groups, sft_examples
from h3fusion.trainers.fuse_po import FusePOTrainer
from h3fusion.trainers.fuse_sft import FuseSFTTrainer
from pref_tiny import pref_training_args, random_records, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

_N = 6  # items in the set; batch sizes 1, 3 and 6 divide it


def _items(kind: str) -> list[dict]:
    """_N items of one kind with unequal, dataset-normalised weights."""
    if kind == "sft":
        return sft_examples(random_records(2, per_source=2), top_k=3, temperature=0.5)
    if kind == "rloo":
        return rloo_groups(random_records(_N, sources=("a", "b"), per_source=1), temperature=0.7)
    n = 2
    while True:  # enough prompts that _N pairs / triplets survive the filters
        mode = "wrpo" if kind == "wrpo" else "per_source"
        pairs = build_pairs(random_records(n, per_source=2), mode=mode, target_source="target", temperature=0.5)
        if len(pairs) >= _N:
            if kind == "wrpo":  # WRPO triplets have unit weights; give them unequal ones (the losses accept any)
                pairs = [{**p, "weight": 0.2 + float(torch.rand(()))} for p in pairs]
            return normalize_weights(pairs[:_N])
        n *= 2


def _trainer(kind: str, model, tok, data, tmp_path):
    args = pref_training_args(tmp_path, max_steps=1)
    if kind == "sft":
        return FuseSFTTrainer(model, args, data, None, tok)
    beta = {"dpo": 0.5, "simpo": 2.0, "wrpo": 0.5, "rloo": 0.1}[kind]
    ref = tiny_llama(len(tok))  # a reference unlike the policy: non-zero implicit rewards
    return FusePOTrainer(model, ref, args, data, None, tok, loss=kind, beta=beta, kl_coef=0.05, alpha_max=0.5)


def _grad(trainer, model, items) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, trainer.data_collator(items)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo", "wrpo", "rloo"])
def test_minibatch_gradients_average_to_the_full_batch_gradient(kind, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    data = _items(kind)
    assert len(data) == _N
    weights = [w for it in data for w in it.get("weights", [it.get("weight")])]
    assert max(weights) > 1.2 * min(weights)  # the weights differ: a batch reduction that cancels them would show
    trainer = _trainer(kind, model, tok, data, tmp_path)
    if kind == "wrpo":
        trainer.current_alpha = lambda: 0.4
    items = [trainer.train_dataset[i] for i in torch.randperm(_N).tolist()]  # with the reference log-probs
    model.train()
    full = _grad(trainer, model, items)
    scale = max(g.abs().max().item() for g in full)
    for bs in (1, 3):
        batches = [items[s : s + bs] for s in range(0, _N, bs)]
        grads = [_grad(trainer, model, b) for b in batches]
        for j, want in enumerate(full):
            mean = sum(g[j] for g in grads) / len(batches)
            torch.testing.assert_close(mean, want, rtol=1e-4, atol=1e-5 * scale, msg=f"{kind}, batch size {bs}")


def _sft_curve(tau: float, model, tok, records, tmp_path) -> list[float]:
    data = sft_examples(records, top_k=3, temperature=tau)
    args = pref_training_args(tmp_path / f"tau{tau}", max_steps=6, per_device_train_batch_size=1)
    trainer = FuseSFTTrainer(copy.deepcopy(model), args, data, None, tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]


def test_temperature_changes_training_at_batch_size_one(tmp_path):
    """With sum w l / sum w per batch, a batch of one cancelled its weight: tau = 0.05 and tau = 100 trained
    bit-identically. Now the weight scales the step."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    records = random_records(3, per_source=2)
    sharp = _sft_curve(0.05, model, tok, records, tmp_path)
    flat = _sft_curve(100.0, model, tok, records, tmp_path)
    assert len(sharp) == len(flat) == 6
    assert max(abs(a - b) for a, b in zip(sharp, flat, strict=True)) > 1e-2, (sharp, flat)
    again = _sft_curve(0.05, model, tok, records, tmp_path)  # the difference is the temperature, not noise
    assert again == sharp


def test_tiny_temperature_never_kills_a_run(tmp_path):
    """At tau = 0.02 most float32 weights are exact zeros; a batch of them used to raise ("weights must not all be
    zero"). Now they are dropped, counted in a warning, and the run trains on the rest."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    records = random_records(4, per_source=2)  # rewards in [-2, 2]: gaps of ~4 give exp(-200) = 0 in float32
    with pytest.warns(UserWarning, match=r"sft_examples: dropped \d+ of 24 responses"):
        data = sft_examples(records, temperature=0.02)
    assert all(it["weight"] > 0 for it in data) and len(data) < 24
    args = pref_training_args(tmp_path / "sft", max_steps=2 * len(data), per_device_train_batch_size=1)
    trainer = FuseSFTTrainer(copy.deepcopy(model), args, data, None, tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert len(losses) == 2 * len(data) and all(math.isfinite(v) for v in losses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = build_pairs(records, mode="per_source", temperature=0.02)
    args = pref_training_args(tmp_path / "po", max_steps=4, per_device_train_batch_size=1)
    po = FusePOTrainer(copy.deepcopy(model), None, args, pairs, None, tok, loss="dpo")
    po.train()
    assert po.state.global_step == 4


def test_trainers_check_their_datasets(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    args = pref_training_args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        FuseSFTTrainer(model, args, [], None, tok)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        FusePOTrainer(model, None, args, [], None, tok, loss="simpo")
    data = sft_examples(random_records(2), temperature=0.5)
    half = sorted(data, key=lambda it: it["weight"])[-3:]  # a subset of a normalised list: its mean is not 1
    with pytest.warns(UserWarning, match=r"train_dataset: the mean weight is .*normalize_weights"):
        FuseSFTTrainer(model, args, half, None, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FuseSFTTrainer(model, args, normalize_weights(half), None, tok)
    with pytest.raises(ValueError, match="weights must be finite"):
        FuseSFTTrainer(model, args, [{**data[0], "weight": -1.0}], None, tok)


def test_check_dataset_reads_hugging_face_columns():
    import datasets  # a dependency of the package
    from h3fusion.trainers.preference_common import check_dataset

    pairs = build_pairs(random_records(3), mode="per_source", temperature=0.5)
    check_dataset(datasets.Dataset.from_list(pairs), "train_dataset")  # normalised: silent
    groups = rloo_groups(random_records(2), temperature=0.5)
    check_dataset(datasets.Dataset.from_list(groups), "train_dataset")
    skewed = datasets.Dataset.from_list([{**p, "weight": 3.0 * p["weight"]} for p in pairs])
    with pytest.warns(UserWarning, match="mean weight is 3"):
        check_dataset(skewed, "train_dataset")
    with pytest.raises(ValueError, match="eval_dataset is empty"):
        check_dataset(datasets.Dataset.from_list([]), "eval_dataset")
