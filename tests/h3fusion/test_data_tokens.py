"""h3fusion.data.tokens: one EOS per response (also when the text already ends with it), the pad fallback."""

from __future__ import annotations

import pytest
from h3fusion.data.instructions import InstructionExample, tokenize_instruction
from h3fusion.data.tokens import IGNORE_INDEX, ensure_pad_token, pad_token_id, response_token_ids
from h3fusion.trainers.sequence_logprobs import encode_example
from pref_tiny import tiny_tokenizer

import h3fusion_ext


def _split_special(tok):
    """The tiny tokenizer, but reading "</s>" in text as plain characters (as `split_special_tokens=True` does)."""
    tok.split_special_tokens = True
    assert tok.eos_token_id not in tok("the cat</s>", add_special_tokens=False)["input_ids"]
    return tok


@pytest.mark.parametrize("split_special", [False, True])
def test_response_ending_with_eos_gets_no_second_one(split_special):
    tok = tiny_tokenizer()
    if split_special:
        tok = _split_special(tok)
    eos = tok.eos_token_id
    plain = response_token_ids(tok, "the cat sat")
    assert plain[-1] == eos and plain.count(eos) == 1
    assert response_token_ids(tok, "the cat sat</s>") == plain
    assert response_token_ids(tok, "the cat sat", add_eos=False) == plain[:-1]
    assert response_token_ids(tok, "") == [eos]
    assert response_token_ids(tok, "</s>") == [eos]


@pytest.mark.parametrize("split_special", [False, True])
def test_fuse_and_instruction_tokenisation_add_one_eos(split_special):
    tok = tiny_tokenizer()
    if split_special:
        tok = _split_special(tok)
    eos = tok.eos_token_id
    a = encode_example(tok, "why is the cat red", "the cat is big")
    b = encode_example(tok, "why is the cat red", "the cat is big</s>")
    assert a == b and a["input_ids"][-1] == eos and a["input_ids"].count(eos) == 1
    index = {"helpful": 0}
    x = tokenize_instruction(tok, InstructionExample("why is the cat red", "the cat is big", "helpful"), index)
    y = tokenize_instruction(tok, InstructionExample("why is the cat red", "the cat is big</s>", "helpful"), index)
    assert x == y and x["input_ids"][-1] == eos and x["input_ids"].count(eos) == 1
    assert x["labels"][-1] == eos and IGNORE_INDEX in x["labels"]


def test_pad_token_fallback():
    tok = tiny_tokenizer()
    assert pad_token_id(tok) == tok.pad_token_id
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert pad_token_id(tok) == tok.eos_token_id
    assert ensure_pad_token(tok) is tok and tok.pad_token_id == tok.eos_token_id
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad"):
        pad_token_id(tok)
    with pytest.raises(ValueError, match="neither a pad"):
        ensure_pad_token(tok)


def test_one_ignore_index():
    """The labels' ignore index is the ops' default ignore index."""
    import importlib
    import inspect

    instructions = importlib.import_module("h3fusion.data.instructions")
    sequence_logprobs = importlib.import_module("h3fusion.trainers.sequence_logprobs")
    assert instructions.IGNORE_INDEX is IGNORE_INDEX and sequence_logprobs.IGNORE_INDEX is IGNORE_INDEX
    default = inspect.signature(h3fusion_ext.linear_logprob).parameters["ignore_index"].default
    assert default == IGNORE_INDEX == -100
