"""Reference linear log-prob: materialise the logits, log_softmax, gather."""

from __future__ import annotations

import torch


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logp_n = h_n . W[t_n] - logsumexp_v(h_n . W[v]); ignored positions give 0.

    Args:
        hidden: [N, H] float.
        weight: [V, H], same dtype as hidden.
        targets: [N] integer ids in [0, V) or ignore_index.
        ignore_index: target value whose position gives 0 and no gradient.
        return_lse: also return the per-row logsumexp [N].

    Returns:
        logp: [N] float32 (float64 for float64 inputs); with return_lse, (logp, lse).
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.T).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).to(torch.int64)
    logp = logits.gather(1, safe.unsqueeze(1)).squeeze(1) - lse
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    return (logp, lse) if return_lse else logp
