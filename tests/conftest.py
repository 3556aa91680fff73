"""Shared test fixtures: seeds, device parametrisation, and the flash-attention tolerance rule."""

from __future__ import annotations

import pytest
import torch

import h3fusion_ext

HAS_GPU = torch.cuda.is_available() and h3fusion_ext.has_cuda_kernels()
requires_cuda = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and a CUDA build of h3fusion_ext")


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` skip with a reason on machines without a GPU (CI has none).
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of h3fusion_ext"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run (never a fixed seed), but printed so a failure can be replayed."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: extra OpenMP threads only add spin-waiting on a busy CI machine).

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_close_to_reference(ours, ref_lowp, ref_fp, factor: float = 2.0, atol: float = 1e-6, what: str = ""):
    """flash-attention's rule: our error vs a high-precision reference must be at most `factor` times the error of
    PyTorch's own computation in the same low precision (`ref_lowp`), plus a small atol.

    Args:
        ours: our result (any dtype).
        ref_lowp: the reference computed by PyTorch in the same dtype as ours.
        ref_fp: the reference computed in fp32/fp64.
        factor: 2 for forward values, 3 for gradients.
    """
    ours, ref_lowp, ref_fp = (t.detach().double() for t in (ours, ref_lowp, ref_fp))
    our_err = (ours - ref_fp).abs().max().item() if ours.numel() else 0.0
    torch_err = (ref_lowp - ref_fp).abs().max().item() if ours.numel() else 0.0
    assert our_err <= factor * torch_err + atol, (
        f"{what}: max error {our_err:.3g} > {factor} x PyTorch's own {torch_err:.3g} + {atol:g}"
    )
