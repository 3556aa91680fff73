"""The one rule for the dtype the ops (and the layers around them) accumulate in."""

from __future__ import annotations

import torch


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of `dtypes` is float64, else float32: bf16/fp16/fp32 compute in fp32, and an fp64 model
    (the tests' exact oracle) is never rounded to fp32 on the way (router logits, routing weights, log-probs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
