"""The CUDA moe_ffn GEMM-backend mode API (h3fusion_ext/gemm_backend.py, csrc/cuda/moe_gemm_backend.cpp).

Needs no GPU: the mode ops take no tensors. In a build without CUDA kernels the API says so. Which backend a call
runs, and its results, are tested on the GPU in test_cuda_moe_ffn.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import h3fusion_ext

ops = torch.ops.h3fusion
needs_cuda_build = pytest.mark.skipif(not h3fusion_ext.has_cuda_kernels(), reason="a build without CUDA kernels")


def test_without_cuda_kernels_the_api_says_so():
    if h3fusion_ext.has_cuda_kernels():
        assert h3fusion_ext.moe_ffn_backend() in ("none", "own", "torch")
        return
    assert h3fusion_ext.moe_ffn_backend() == "none"
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        h3fusion_ext.set_moe_ffn_gemm_mode("own")


@needs_cuda_build
def test_mode_context_restores_and_nests():
    before = ops.moe_ffn_set_gemm_backend(None)
    with h3fusion_ext.moe_ffn_gemm_mode("own"):
        assert ops.moe_ffn_set_gemm_backend(None) == "own"
        with h3fusion_ext.moe_ffn_gemm_mode("torch"):
            assert ops.moe_ffn_set_gemm_backend(None) == "torch"
        assert ops.moe_ffn_set_gemm_backend(None) == "own"
    assert ops.moe_ffn_set_gemm_backend(None) == before
    assert h3fusion_ext.set_moe_ffn_gemm_mode("auto") == before
    assert h3fusion_ext.set_moe_ffn_gemm_mode(before) == "auto"


@needs_cuda_build
def test_bad_modes_are_refused_and_change_nothing():
    before = ops.moe_ffn_set_gemm_backend(None)
    with pytest.raises(ValueError, match="mode must be one of"):
        h3fusion_ext.set_moe_ffn_gemm_mode("fast")
    with pytest.raises(RuntimeError, match='"auto", "own" or "torch"'):
        ops.moe_ffn_set_gemm_backend("fast")
    assert ops.moe_ffn_set_gemm_backend(None) == before


def _mode_in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    code = "import torch, h3fusion_ext; print(torch.ops.h3fusion.moe_ffn_set_gemm_backend(None))"
    env = dict(os.environ, H3FUSION_GROUPED_GEMM=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@needs_cuda_build
def test_environment_variable_sets_the_initial_mode():
    done = _mode_in_subprocess("own")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "own"
    bad = _mode_in_subprocess("fastest")
    assert bad.returncode != 0 and "H3FUSION_GROUPED_GEMM must be" in bad.stderr
