"""The causal-LM loss: token-mean next-token NLL over the labelled positions.

`lm_loss_from_hidden` computes it from the final (post-norm) hidden states and the LM head's weight with
`h3fusion_ext.linear_logprob`, so the `[B, S, V]` logits never exist: only the labelled positions go through the
vocabulary projection, one vocabulary chunk at a time. `causal_lm_loss` is the same loss from materialised logits
(transformers' path); the two agree to fp32 rounding in value and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import h3fusion_ext

from ..data.tokens import IGNORE_INDEX

__all__ = ["causal_lm_loss", "lm_loss_from_hidden"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of next-token prediction over labelled positions, from logits (labels -100 are ignored).

    Args:
        logits: [B, S, V] (any float dtype; computed in fp32).
        labels: int64 [B, S]; position s is predicted from positions < s.

    Returns:
        fp32 scalar (0 with a graph when no position is labelled).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def lm_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T, labels)` without the logits, through `h3fusion_ext.linear_logprob`.

    Position s's hidden state predicts token s+1 (the label shift); positions whose next label is -100 (prompt,
    padding, the last position) are dropped before the vocabulary projection and get no gradient.

    Args:
        hidden: [B, S, H] final (post-norm) hidden states, fp32/bf16/fp16/fp64.
        weight: [V, H] bias-free LM head weight (cast to hidden's dtype when it differs; under autocast both are
            cast to the autocast dtype, as `F.linear` would be).
        labels: int64 [B, S], -100 where no token is predicted.

    Returns:
        fp32 scalar (fp64 for fp64 hidden), differentiable w.r.t. hidden and weight; 0 with a graph when no
        position is labelled.

    Raises:
        ValueError: shapes that do not fit together (the message names the argument).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, S, H], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be [B, S] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, H={hidden.shape[2]}], got shape {tuple(weight.shape)}")
    targets = labels[:, 1:].to(hidden.device)
    valid = targets != IGNORE_INDEX
    h = hidden[:, :-1][valid]  # [N, H]: only the positions that predict a labelled token
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if h.shape[0] == 0:
        return hidden.sum().to(acc) * 0.0
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    logp = h3fusion_ext.linear_logprob(h, w, targets[valid], IGNORE_INDEX)
    return -logp.to(acc).mean()
