"""Loads the compiled library `h3fusion_ext._C`, which registers the `torch.ops.h3fusion` ops."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "h3fusion_ext._C is not built. Install the package with `pip install --no-build-isolation -e .` "
        "(or run `python setup.py build_ext --inplace`) first."
    ) from exc

ops = torch.ops.h3fusion


def has_cuda_kernels() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(ops.has_cuda_kernels())
