"""Sequence log-probs of responses from a causal LM without materialising its [tokens, vocab] logits.

The model runs once up to its last (final-norm) hidden states; the response positions are picked out, shifted by
one, and `h3fusion_ext.linear_logprob(hidden, lm_head.weight, targets)` gives each response token's log-prob.
Only the response tokens go through the vocabulary projection, in the op's chunks.

Tokenisation: `encode_example` turns (prompt, response) into `input_ids` and `labels` (prompt and padding
labelled `IGNORE_INDEX`, -100, defined in `h3fusion.data.tokens`), `collate_examples` right-pads a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

import h3fusion_ext

from ..data.tokens import IGNORE_INDEX, response_token_ids

__all__ = [
    "IGNORE_INDEX",
    "SequenceLogprobs",
    "collate_examples",
    "encode_example",
    "last_hidden_states",
    "sequence_logprobs",
]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / DeepSpeed / torch.compile wrappers keep the real model in `.module` / `._orig_mod`.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    chat_template: bool = False,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenise prompt + response; only the response tokens (and the EOS) carry labels.

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), or through its chat template as one user
    turn with the generation prompt when `chat_template`; the response without special tokens, then one EOS (none
    added when the response text already ends with it: `h3fusion.data.tokens.response_token_ids`). Too long
    examples keep the prompt's last `max_prompt_length` tokens and cut the response's tail to fit `max_length`.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt, response: text.
        max_length: total token budget (None: unlimited).
        max_prompt_length: prompt token budget (None: max_length // 2 when max_length is set).
        chat_template: format the prompt with `tokenizer.apply_chat_template`.
        add_eos: end the response with `tokenizer.eos_token_id` (when the tokenizer has one).

    Returns:
        {"input_ids": list[int], "labels": list[int]} of equal length; labels are -100 on the prompt.
    """
    if chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
    else:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    response_ids = response_token_ids(tokenizer, response, add_eos=add_eos)
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        budget = max_prompt_length if max_prompt_length is not None else max_length // 2
        if len(prompt_ids) + len(response_ids) > max_length:
            if len(prompt_ids) > budget:
                prompt_ids = prompt_ids[len(prompt_ids) - max(budget, 1) :]
            response_ids = response_ids[: max(max_length - len(prompt_ids), 1)]
    if not prompt_ids:
        # the first token is never predicted; a response needs a context token before it
        raise ValueError("prompt tokenises to nothing and the tokenizer adds no BOS: nothing conditions the response")
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def collate_examples(examples: Sequence[dict[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch.

    Args:
        examples: dicts with "input_ids" and "labels" lists (from `encode_example`).
        pad_token_id: the id used for padding (its positions are masked and unlabelled).

    Returns:
        input_ids [B, S] int64, attention_mask [B, S] int64, labels [B, S] int64 (-100 on prompt and padding).
    """
    if not examples:
        raise ValueError("examples must not be empty")
    width = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if len(e["labels"]) != n:
            raise ValueError(f"examples[{i}]: input_ids and labels differ in length ({n} vs {len(e['labels'])})")
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def last_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's final (post-norm) hidden states, computing logits for one position only.

    Runs the model's own forward (so DDP / FSDP / DeepSpeed wrappers see a normal forward) with
    `output_hidden_states=True` and `logits_to_keep=1`; the last entry of `hidden_states` is the decoder output that
    feeds the lm_head.

    Args:
        model: a transformers causal LM (possibly wrapped).
        input_ids: [B, S] int64.
        attention_mask: [B, S] 0/1.

    Returns:
        [B, S, H] in the model's compute dtype.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
    kwargs.update(use_cache=False, return_dict=True)
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        out = model(**kwargs)  # a model without logits_to_keep: its full logits are computed but not used
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise RuntimeError(f"{type(_unwrap(model)).__name__} returned no hidden_states with output_hidden_states=True")
    return hidden[-1]


class SequenceLogprobs(NamedTuple):
    """Per-sequence results of `sequence_logprobs`.

    logps: [B] float32, summed log-probs of the labelled tokens.
    lengths: [B] int64, number of labelled tokens.
    token_logps: [B, S-1] float32 (0 where unlabelled) or None; position t holds the log-prob of token t+1.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor | None


def _lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no output embedding (lm_head) weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm_head has a bias; linear_logprob computes h . W[v] without one")
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported (logits are not h . W[v])")
    if getattr(cfg, "logit_scale", None) not in (None, 1.0):
        raise ValueError("models with a logit_scale are not supported (logits are not h . W[v])")
    return head.weight


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    per_token: bool = False,
) -> SequenceLogprobs:
    """Summed response log-probs of each sequence via `h3fusion_ext.linear_logprob` (no full logits).

    log pi(y | x) = sum_{t : labels[t+1] != -100} log softmax(h_t W^T)[labels[t+1]]

    Args:
        model: a transformers causal LM whose logits are `lm_head(hidden)` with a bias-free lm_head.
        input_ids: [B, S] int64.
        attention_mask: [B, S] 0/1.
        labels: [B, S] int64, -100 where no log-prob is wanted (prompt, padding).
        per_token: also return the per-token log-probs [B, S-1].

    Returns:
        SequenceLogprobs(logps [B] fp32, lengths [B] int64, token_logps [B, S-1] fp32 or None); differentiable
        w.r.t. the model's parameters.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    weight = _lm_head_weight(model)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    b, s = input_ids.shape
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    rows, cols = valid.nonzero(as_tuple=True)
    # Only labelled positions enter the vocabulary projection: the prompt and the padding cost nothing there.
    h = hidden[:, :-1][rows, cols]
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    logp = h3fusion_ext.linear_logprob(h, w, targets[rows, cols]).float()
    seq = torch.zeros(b, dtype=torch.float32, device=logp.device).index_add(0, rows, logp)
    lengths = valid.sum(dim=1)
    token = None
    if per_token:
        token = torch.zeros(b, max(s - 1, 0), dtype=torch.float32, device=logp.device).index_put((rows, cols), logp)
    return SequenceLogprobs(seq, lengths, token)
