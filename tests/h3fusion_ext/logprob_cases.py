"""Shared setup for the linear_logprob tests (CPU and CUDA): chunking knobs, random inputs, forward + backward."""

from __future__ import annotations

import torch

IGNORE = -100


def set_chunking(monkeypatch, chunking):
    """Set the kernel's (vocab chunk, block elements) environment knobs; None restores the default plan."""
    if chunking is None:
        monkeypatch.delenv("H3FUSION_LOGPROB_VOCAB_CHUNK", raising=False)
        monkeypatch.delenv("H3FUSION_LOGPROB_BLOCK_ELEMS", raising=False)
    else:
        monkeypatch.setenv("H3FUSION_LOGPROB_VOCAB_CHUNK", str(chunking[0]))
        monkeypatch.setenv("H3FUSION_LOGPROB_BLOCK_ELEMS", str(chunking[1]))


def logprob_inputs(n, h, v, dtype, ignore_frac=0.25, device="cpu"):
    """Random (hidden [n, h], weight [v, h], targets [n]) with about `ignore_frac` of the targets set to IGNORE."""
    hidden = torch.randn(n, h, dtype=dtype, device=device)
    weight = torch.randn(v, h, dtype=dtype, device=device) / h**0.25
    targets = torch.randint(0, v, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = IGNORE
    return hidden, weight, targets


def run_logprob(fn, hidden, weight, targets, grad_logp, grad_lse, **kw):
    """Forward + backward of fn with the given upstream gradients; returns (logp, lse, grad_hidden, grad_weight)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, lse = fn(h, w, targets, return_lse=True, **kw)
    (logp * grad_logp.to(logp.dtype)).sum().add((lse * grad_lse.to(lse.dtype)).sum()).backward()
    return logp.detach(), lse.detach(), h.grad, w.grad
