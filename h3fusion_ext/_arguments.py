"""Argument checks shared by the op wrappers and the fake kernels, so every error names the argument it is about.

The fake (meta) kernels check devices because they also run eagerly: when any input is on the `meta` device the
dispatcher picks the Meta kernel for the whole call, so without a check a CPU `x` with `meta` weights would return
an uninitialised CPU tensor instead of an error (issue 8, item 5).
"""

from __future__ import annotations

import operator

import torch

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def int_arg(value, name: str, op: str) -> int:
    """`value` as a Python int; a bool, a float (even 2.0) or any other non-integer raises a TypeError naming it.

    Accepts what `operator.index` accepts: int, numpy integers, integer 0-d tensors, `torch.SymInt`.
    """
    if isinstance(value, bool):
        raise TypeError(f"h3fusion_ext.{op}: {name} must be an integer, got the bool {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        kind = type(value).__name__
        raise TypeError(f"h3fusion_ext.{op}: {name} must be an integer, got {value!r} ({kind})") from None
    if isinstance(result, int) and not INT64_MIN <= result <= INT64_MAX:
        raise ValueError(f"h3fusion_ext.{op}: {name} must fit in int64, got {result}")
    return result


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` (None skipped) must be on `ref`'s device; the error names the first one that is not."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"h3fusion_ext.{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
            )
