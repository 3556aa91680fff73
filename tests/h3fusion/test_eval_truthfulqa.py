"""TruthfulQA MC1/MC2 scored as lm-evaluation-harness does, checked against numbers computed here from the
model's own logits, one unpadded sequence at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eval_tiny import causal_lm, tokenizer, truthfulqa_records
from h3fusion.evaluation.truthfulqa import (
    QA_PRIMER,
    encode_pair,
    mc1_score,
    mc2_score,
    mc_context,
    score_truthfulqa_mc,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_ll(model, ids: list[int], n_cont: int) -> float:
    """log p(last n_cont tokens | the rest), from one forward pass over the unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_cont, len(ids)))


def test_mc1_mc2_match_hand_computation():
    tok = tokenizer()
    model = causal_lm(tok, max_position_embeddings=512)
    records = [dict(r, id=i) for i, r in enumerate(truthfulqa_records())]
    got = score_truthfulqa_mc(model, tok, records, batch_size=3)
    for rec, res in zip(records, got):
        # independent computation: the word-level tokenizer splits on whitespace, so the continuation " " + answer
        # is exactly the answer's words; the prompt is lm-eval's QA primer + question
        ctx_ids = tok(mc_context(rec["question"]), add_special_tokens=False)["input_ids"]
        expected = {}
        for key in ("mc1_targets", "mc2_targets"):
            lls = []
            for choice in rec[key]["choices"]:
                cont = tok(choice, add_special_tokens=False)["input_ids"]
                lls.append(_hand_ll(model, ctx_ids + cont, len(cont)))
            expected[key] = np.array(lls)
        np.testing.assert_allclose(res["mc1_lls"], expected["mc1_targets"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(res["mc2_lls"], expected["mc2_targets"], rtol=1e-5, atol=1e-4)
        # MC1: the argmax choice is the true one (labels[0] == 1 in the file)
        assert res["mc1"] == float(int(np.argmax(expected["mc1_targets"])) == 0)
        # MC2: normalised probability mass of the true answers, lm-eval's formula verbatim
        probs = np.exp(expected["mc2_targets"])
        labels = np.array(rec["mc2_targets"]["labels"])
        assert res["mc2"] == pytest.approx(float(np.sum(probs[labels == 1]) / np.sum(probs)), rel=1e-4)


def test_scores_do_not_depend_on_batch_size():
    tok = tokenizer()
    model = causal_lm(tok, max_position_embeddings=512)
    records = [dict(r, id=i) for i, r in enumerate(truthfulqa_records())]
    a = score_truthfulqa_mc(model, tok, records, batch_size=1)
    b = score_truthfulqa_mc(model, tok, records, batch_size=8)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["mc2_lls"], y["mc2_lls"], rtol=1e-5, atol=1e-5)


def test_context_is_left_truncated_like_lm_eval():
    # a model whose context (40 positions) is shorter than the primer: lm-eval feeds (ctx + cont)[-(L+1):][:-1]
    tok = tokenizer()
    model = causal_lm(tok, max_position_embeddings=40)
    rec = dict(truthfulqa_records()[0], id=0)
    got = score_truthfulqa_mc(model, tok, [rec], batch_size=2)[0]
    ctx_ids = tok(mc_context(rec["question"]), add_special_tokens=False)["input_ids"]
    for choice, ll in zip(rec["mc1_targets"]["choices"], got["mc1_lls"]):
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        full = (ctx_ids + cont)[-(40 + 1) :]
        # the last token is only a target; the model sees full[:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full[:-1]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[len(full) - 1 - len(cont) + j, cont[j]]) for j in range(len(cont)))
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_prompt_is_the_qa_primer():
    text = mc_context("Why?")
    assert text.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert text.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Why?\nA:")
    assert text.count("\nA:") == 7 and QA_PRIMER.count("Q: ") == 6  # six primer pairs + the question


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer trained here (spaces attach to the following word, as in GPT-2/Llama-3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    t.train_from_iterator(["Q: is it yes or no?\nA: yes it is", "A: no it is not", "yes yes no no"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    return tok


def test_encode_pair_splits_the_whole_encoding():
    tok = _bpe_tokenizer()
    ctx, cont = encode_pair(tok, "Q: is it?\nA:", " yes it is")
    whole = tok("Q: is it?\nA: yes it is", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    assert tok.decode(cont) == " yes it is"
    # a trailing space of the context moves to the continuation (so " yes" keeps its space-prefixed token)
    assert encode_pair(tok, "Q: is it?\nA: ", "yes it is") == (ctx, cont)


def test_encode_pair_with_special_tokens():
    tok = _bpe_tokenizer()
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))]
    )
    bos = tok.convert_tokens_to_ids("<s>")
    ctx, cont = encode_pair(tok, "A:", " yes", add_special_tokens=True)
    assert ctx[0] == bos and bos not in cont
    ctx2, cont2 = encode_pair(tok, "A:", " yes", add_special_tokens=False)
    assert ctx2 == ctx[1:] and cont2 == cont
    # text that already starts with BOS gets no second one
    ctx3, _ = encode_pair(tok, "<s>A:", " yes", add_special_tokens=True)
    assert ctx3.count(bos) == 1


def test_mc1_ties_go_to_the_first_choice():
    assert mc1_score([-1.0, -1.0, -3.0], [1, 0, 0]) == 1.0
    assert mc1_score([-1.0, -1.0, -3.0], [0, 1, 0]) == 0.0
    assert mc1_score([-2.0, -1.0], [1, 0]) == 0.0


def test_mc2_formula_and_underflow():
    lls = [-1.0, -2.0, -0.5]
    p = np.exp(lls)
    assert mc2_score(lls, [1, 0, 1]) == pytest.approx((p[0] + p[2]) / p.sum(), rel=1e-12)
    # lm-eval's plain exp() underflows to 0/0 here; the value is still defined
    assert mc2_score([-800.0, -801.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    assert mc2_score([-5.0, -5.0, -5.0, -5.0], [1, 0, 0, 1]) == pytest.approx(0.5)
