"""Shared test fixtures: seeds, device parametrisation, and the flash-attention tolerance rule."""

from __future__ import annotations

import os
import random
import socket

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


def free_port() -> int:
    """A TCP port free right now (the OS picks it), for torchrun's --master_port: not drawn from the seeded `random`,
    so a replayed seed never reuses a port still in TIME_WAIT from the run before."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEED_ENV = "H3FUSION_TEST_SEED"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run (never a fixed seed; torch and Python's `random` alike) unless
    H3FUSION_TEST_SEED sets one; a failing test's report shows its seed (see pytest_runtest_makereport) so the
    failure can be replayed with that variable."""
    chosen = os.environ.get(SEED_ENV, "").strip()
    if chosen:
        try:
            seed = int(chosen)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV} must be an integer seed, got {chosen!r}") from None
    else:
        seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)  # tests draw seeds for worker processes from `random` too: the replay must reproduce them
    request.node.user_properties.append(("torch_seed", seed))
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = dict(item.user_properties).get("torch_seed")
    if report.failed and seed is not None:
        report.sections.append(("torch seed", f"torch seed {seed}: replay with {SEED_ENV}={seed}"))
    return report


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: extra OpenMP threads only add spin-waiting on a busy CI machine).

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_close_to_reference(
    ours, ref_lowp, ref_fp, factor: float = 2.0, atol: float = 1e-6, what: str = "", ulps: float = 1.0
):
    """flash-attention's rule: our error vs a high-precision reference must be at most `factor` times the error of
    PyTorch's own computation in the same low precision (`ref_lowp`), plus a small atol.

    The allowance never drops below `ulps` ulps of the low precision at the reference's largest magnitude
    (``ulps * finfo(dtype).eps * max|ref_fp|``, dtype = the lower precision of `ours` and `ref_lowp`): on tiny shapes
    PyTorch's own error can be exactly 0 by chance while ours is one rounding away, which is no defect.

    Args:
        ours: our result (any dtype).
        ref_lowp: the reference computed by PyTorch in the same dtype as ours.
        ref_fp: the reference computed in fp32/fp64.
        factor: 2 for forward values, 3 for gradients.
        ulps: the floor in ulps; raise it only where PyTorch's own error is measured to reach it (say so at the call).
    """
    float_dtypes = [t.dtype for t in (ours, ref_lowp) if t.is_floating_point()]
    eps = max((torch.finfo(d).eps for d in float_dtypes), default=0.0)
    ours, ref_lowp, ref_fp = (t.detach().double() for t in (ours, ref_lowp, ref_fp))
    our_err = (ours - ref_fp).abs().max().item() if ours.numel() else 0.0
    torch_err = (ref_lowp - ref_fp).abs().max().item() if ours.numel() else 0.0
    ulp_floor = ulps * eps * ref_fp.abs().max().item() if ours.numel() else 0.0
    allowed = max(factor * torch_err, ulp_floor) + atol
    assert our_err <= allowed, (
        f"{what}: max error {our_err:.3g} > max({factor} x PyTorch's own {torch_err:.3g}, {ulps:g} ulp"
        f" {ulp_floor:.3g}) + {atol:g}"
    )
