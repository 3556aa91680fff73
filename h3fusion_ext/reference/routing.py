"""Reference top-k routing: softmax, top-k with ties to the lower expert index, optional renormalisation."""

from __future__ import annotations

import torch


def topk_route(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its k most probable experts.

    Args:
        logits: [T, E] router logits, any float dtype.
        k: experts per token, 1 <= k <= E.
        renormalize: rescale the k kept probabilities to sum to 1 (Mixtral's rule).

    Returns:
        weights: [T, k] float32 (float64 for float64 logits), in descending order per token.
        experts: [T, k] int32, the chosen expert ids; equal probabilities go to the lower id first.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(acc), dim=-1)
    # torch.topk gives no tie guarantee; a stable descending sort puts equal values in index order.
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order.to(torch.int32)
