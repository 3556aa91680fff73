"""pytest-benchmark microbenchmarks of `linear_logprob` (run with `pytest benchmarks/`; not part of `tests/`).

Ours vs the materialised `log_softmax` + gather, forward and forward+backward. Small CPU shapes by default; on a
CUDA machine the same benchmarks run on the GPU in bf16 at a Llama-3-like vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from h3fusion.bench.common import synchronize
from h3fusion.bench.logprob_bench import _make_inputs, _materialized, _ours, _step

import h3fusion_ext

DEVICE = "cuda" if torch.cuda.is_available() and h3fusion_ext.has_cuda_kernels() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# (N, H, V)
SHAPE = (4096, 4096, 128256) if DEVICE == "cuda" else (1024, 256, 8000)
IMPLS = {"ours": _ours, "materialized": _materialized}


@pytest.fixture(scope="module")
def inputs():
    hidden, weight, targets = _make_inputs(*SHAPE, DTYPE, DEVICE)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_logprob(benchmark, inputs, impl, mode):
    fn = IMPLS[impl]

    def run():
        _step(fn, *inputs, mode)
        synchronize(DEVICE)

    benchmark(run)
    # the two paths agree, so the timings compare the same computation
    with torch.no_grad():
        torch.testing.assert_close(_ours(*inputs), _materialized(*inputs), rtol=1e-3, atol=1e-3)
