"""Sequence log-probs through linear_logprob equal those from the model's full logits (values and gradients)."""

from __future__ import annotations

import random

import pytest
import torch
from h3fusion.trainers.sequence_logprobs import (
    IGNORE_INDEX,
    collate_examples,
    encode_example,
    sequence_logprobs,
)
from pref_tiny import random_text, tiny_llama, tiny_tokenizer
from training_tiny import tiny_mixtral_config

import h3fusion_ext


def _batch(tok, n, max_length=None):
    rng = random.Random(int(torch.randint(0, 2**31, ()).item()))
    examples = [
        encode_example(tok, random_text(rng, 1, 8), random_text(rng, 1, 10), max_length=max_length) for _ in range(n)
    ]
    return collate_examples(examples, tok.pad_token_id)


def _full_logits_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = batch["labels"][:, 1:]
    valid = tgt != IGNORE_INDEX
    tok = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    return tok.sum(-1), valid.sum(-1), tok


def test_encode_masks_prompt_and_appends_eos():
    tok = tiny_tokenizer()
    e = encode_example(tok, "why is the cat red", "the cat is big")
    p = tok("why is the cat red")["input_ids"]
    r = tok("the cat is big", add_special_tokens=False)["input_ids"]
    assert e["input_ids"] == p + r + [tok.eos_token_id]
    assert e["labels"] == [IGNORE_INDEX] * len(p) + r + [tok.eos_token_id]
    short = encode_example(tok, "why is the cat red " * 5, "the cat is big " * 5, max_length=12, max_prompt_length=4)
    assert len(short["input_ids"]) == 12
    assert short["labels"][:4] == [IGNORE_INDEX] * 4 and all(v != IGNORE_INDEX for v in short["labels"][4:])


def test_collate_pads_right_and_masks():
    tok = tiny_tokenizer()
    b = _batch(tok, 4)
    lens = b["attention_mask"].sum(1)
    for i in range(4):
        assert bool((b["input_ids"][i, lens[i] :] == tok.pad_token_id).all())
        assert bool((b["labels"][i, lens[i] :] == IGNORE_INDEX).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_full_logits_values_and_gradients(dtype, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok)).to(dtype)
    batch = _batch(tok, 5)
    calls = []
    real = h3fusion_ext.linear_logprob

    def spy(hidden, weight, targets, *a, **k):
        calls.append((tuple(hidden.shape), tuple(weight.shape)))
        return real(hidden, weight, targets, *a, **k)

    monkeypatch.setattr(h3fusion_ext, "linear_logprob", spy)
    ours = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], per_token=True)
    ref_seq, ref_len, ref_tok = _full_logits_logps(model, batch)
    # one call over exactly the labelled tokens, against the lm_head weight
    assert calls == [((int(ref_len.sum()), model.config.hidden_size), (len(tok), model.config.hidden_size))]
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(ours.logps, ref_seq.float(), **tol)
    torch.testing.assert_close(ours.token_logps, ref_tok.float(), **tol)
    assert torch.equal(ours.lengths, ref_len)
    w = torch.rand(5)
    params = [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight, model.model.embed_tokens.weight]
    g_ours = torch.autograd.grad((ours.logps * w).sum(), params)
    g_ref = torch.autograd.grad((ref_seq.float() * w).sum(), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_a_sequence():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    batch = _batch(tok, 3)
    together = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        alone = sequence_logprobs(
            model,
            batch["input_ids"][i : i + 1, :n],
            batch["attention_mask"][i : i + 1, :n],
            batch["labels"][i : i + 1, :n],
        ).logps
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-4)


def test_rejects_bias_and_bad_shapes():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    batch = _batch(tok, 2)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"][:, :-1])
    model.lm_head.bias = torch.nn.Parameter(torch.randn(len(tok)))
    with pytest.raises(ValueError, match="bias"):
        sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` argument (older / custom architectures)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, use_cache=None, return_dict=True):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_model_without_logits_to_keep():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    batch = _batch(tok, 3)
    a = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    b = sequence_logprobs(_NoLogitsToKeep(model), batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    torch.testing.assert_close(a, b)


def test_moe_model_matches_full_logits():
    """The fused models are Mixtral-style MoEs: the same identity must hold there (router logits are ignored)."""
    from transformers import MixtralForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_mixtral_config(
        vocab_size=len(tok),
        hidden=32,
        intermediate=48,
        max_positions=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        output_router_logits=True,
    )
    model = MixtralForCausalLM(cfg)
    batch = _batch(tok, 4)
    ours = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref_seq, ref_len, _ = _full_logits_logps(model, batch)
    torch.testing.assert_close(ours.logps, ref_seq, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours.lengths, ref_len)


def test_bf16_error_within_twice_pytorchs_own():
    """flash-attention's rule: our bf16 error vs an fp64 computation <= 2x that of PyTorch's bf16 full logits."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok)).double()
    batch = _batch(tok, 4)
    ref_fp, _, _ = _full_logits_logps(model, batch)
    low = model.to(torch.bfloat16)
    ours = sequence_logprobs(low, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    logits = low(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # bf16
    tgt = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    ref_low = (lp * (tgt != IGNORE_INDEX)).sum(-1)
    our_err = (ours.double() - ref_fp).abs().max().item()
    torch_err = (ref_low.double() - ref_fp).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-3, (our_err, torch_err)
