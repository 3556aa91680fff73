"""The token-level conventions every data path shares: the ignore index, the pad-token fallback, the EOS rule.

Instruction data (`h3fusion.data.instructions`), preference data (`h3fusion.trainers.sequence_logprobs`
`encode_example`) and the collators all take these from here, so there is one definition of each.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IGNORE_INDEX", "ensure_pad_token", "pad_token_id", "response_token_ids"]

# Label of positions that carry no loss (prompt, padding); also the default `ignore_index` of
# `h3fusion_ext.linear_logprob` and of `torch.nn.functional.cross_entropy`.
IGNORE_INDEX = -100


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token (padding is masked and unlabelled).

    Raises:
        ValueError: the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad_token_id nor an eos_token_id to pad with")
    return int(pad)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as pad token (in place; the same fallback as
    `pad_token_id`). Returns the tokenizer."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def response_token_ids(tokenizer: Any, text: str, *, add_eos: bool = True) -> list[int]:
    """Tokenise a response (no special tokens added) and end it with exactly one EOS.

    A text that already ends with the EOS token (as text, e.g. "...</s>", or as the last id when the tokenizer
    parses special tokens in text) is not given a second one: the written EOS is removed from the text and the EOS
    id appended once, so "answer</s>" and "answer" tokenise the same.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the response.
        add_eos: end with `tokenizer.eos_token_id` (when the tokenizer has one).

    Returns:
        the token ids (list of int).
    """
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if add_eos and eos_id is not None and eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)]
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if add_eos and eos_id is not None and (not ids or ids[-1] != int(eos_id)):
        ids.append(int(eos_id))
    return ids
