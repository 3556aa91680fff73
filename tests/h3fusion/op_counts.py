"""Counting h3fusion_ext op calls at the dispatcher, so a silent fallback to another implementation fails a test.

`count_h3fusion_ops()` is a TorchDispatchMode: every `torch.ops.h3fusion.*` call that reaches a kernel is counted
under its op name (forward and backward ops separately, e.g. "moe_ffn_forward" and "moe_ffn_backward"), however the
Python wrappers reach it. The autograd engine carries the mode into the backward pass.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode


class count_h3fusion_ops(TorchDispatchMode):  # noqa: N801  (used as a context manager, like a function)
    """`with count_h3fusion_ops() as counts: ...` then `counts["moe_ffn_forward"]` (a Counter by op name)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __enter__(self):
        super().__enter__()
        return self.counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func.name().partition("::")
        if namespace == "h3fusion":
            self.counts[name.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_lora_moe_calls():
    """`with count_lora_moe_calls() as calls: ...` counts `h3fusion_ext.moe_ffn(..., lora=...)` calls ("forward")
    and the backward passes that reach their outputs ("backward"), at the public API: the LoRA path may run on
    kernels of its own or on the reference, and either way the call must go through our op's API."""
    import h3fusion_ext

    calls: Counter[str] = Counter()
    original = h3fusion_ext.moe_ffn

    def spy(*args, lora=None, **kwargs):
        y = original(*args, lora=lora, **kwargs)
        if lora is not None:
            calls["forward"] += 1
            if y.requires_grad:
                y.register_hook(lambda grad: calls.update(["backward"]))
        return y

    h3fusion_ext.moe_ffn = spy
    try:
        yield calls
    finally:
        h3fusion_ext.moe_ffn = original
