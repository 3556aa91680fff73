"""Which grouped-GEMM backend the CUDA `moe_ffn` runs: our own kernels ("own") or `torch._grouped_mm` ("torch").

The mode is process-wide: "auto" (the default) runs "torch" where `torch._grouped_mm` has its device-side path for
the call (bfloat16 on sm_90, or sm_100 with torch >= 2.9; H and F multiples of 8; fewer than 1024 experts) and "own"
elsewhere; "own" and "torch" force one backend ("torch" raises for a call `torch._grouped_mm` cannot take). The
environment variable `H3FUSION_GROUPED_GEMM=auto|own|torch` sets the initial mode; it is read once, at the first
CUDA `moe_ffn` call. The CPU op has one implementation and is not affected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ._library import has_cuda_kernels, ops

__all__ = ["MODES", "moe_ffn_backend", "moe_ffn_gemm_mode", "set_moe_ffn_gemm_mode"]

MODES = ("auto", "own", "torch")


def moe_ffn_backend() -> str:
    """The GEMM backend of the latest CUDA `moe_ffn` forward or backward call in this process.

    Returns:
        "own" or "torch"; "none" before any CUDA call, or in a build without CUDA kernels.
    """
    if not has_cuda_kernels():
        return "none"
    return ops.moe_ffn_gemm_backend()


def set_moe_ffn_gemm_mode(mode: str) -> str:
    """Set the process-wide mode ("auto", "own" or "torch") and return the previous one.

    Raises:
        ValueError: an unknown mode.
        RuntimeError: a build without CUDA kernels.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not has_cuda_kernels():
        raise RuntimeError("this build of h3fusion_ext has no CUDA kernels, so there is no GEMM backend to choose")
    return ops.moe_ffn_set_gemm_backend(mode)


@contextlib.contextmanager
def moe_ffn_gemm_mode(mode: str) -> Iterator[None]:
    """Run a block under `mode` ("auto", "own" or "torch"), restoring the previous mode afterwards.

    Example:
        >>> with moe_ffn_gemm_mode("own"):
        ...     y = h3fusion_ext.moe_ffn(x, weights, experts, gate_up_proj, down_proj)
    """
    previous = set_moe_ffn_gemm_mode(mode)
    try:
        yield
    finally:
        ops.moe_ffn_set_gemm_backend(previous)
