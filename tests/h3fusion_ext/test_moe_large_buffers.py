"""The CPU ops' cache of large buffers (csrc/cpu/large_buffers.cpp): a block still held by a tensor is never handed
out again, reused blocks give the same results, the profiler counts a cached block as an allocation every time it is
handed out, and the size limit comes from H3FUSION_CPU_BUFFER_CACHE_MB (0: no cache; nonsense: a named error)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from h3fusion.bench.common import peak_memory_mb
from test_moe_ffn import make_inputs, run_with_grads

import h3fusion_ext
from h3fusion_ext import reference

ROOT = Path(__file__).resolve().parents[2]
# T * k rows of a 2F-wide fp32 pre-activation: 2048 * 4096 * 4 bytes = 32 MiB, the smallest cached size.
SHAPE = dict(T=1024, H=16, F=2048, E=4, k=2)
PRE_ACTIVATION_MIB = 1024 * 2 * 2 * 2048 * 4 / 2**20


def big_inputs(seed):
    torch.manual_seed(seed)
    return make_inputs(SHAPE["T"], SHAPE["H"], SHAPE["F"], SHAPE["E"], SHAPE["k"], torch.float32)


def test_live_blocks_are_not_reused_and_reused_blocks_give_the_same_results():
    a, b = big_inputs(0), big_inputs(1)
    grad_a, grad_b = torch.randn(SHAPE["T"], SHAPE["H"]), torch.randn(SHAPE["T"], SHAPE["H"])
    leaves_a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in a]
    leaves_b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in b]
    # Both forwards hold their pre-activation (>= 32 MiB, from the cache) until their backward.
    y_a = h3fusion_ext.moe_ffn(*leaves_a)
    y_b = h3fusion_ext.moe_ffn(*leaves_b)
    y_b.backward(grad_b)
    y_a.backward(grad_a)
    for inputs, y, leaves, g in ((a, y_a, leaves_a, grad_a), (b, y_b, leaves_b, grad_b)):
        hi = [t.double() if t.is_floating_point() else t for t in inputs]
        ref_y, ref_grads = run_with_grads(reference.moe_ffn, hi, g.double())
        torch.testing.assert_close(y.detach().double(), ref_y, atol=1e-4, rtol=1e-4)
        got = [leaves[i].grad for i in (0, 1, 3, 4)]
        for name, gg, rg in zip(("x", "weights", "gate_up_proj", "down_proj"), got, ref_grads, strict=True):
            torch.testing.assert_close(gg.double(), rg, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # Released blocks come back for the same shape: the same bits as the first time.
    y_again, grads_again = run_with_grads(h3fusion_ext.moe_ffn, a, grad_a)
    assert torch.equal(y_again, y_a.detach())
    for gg, leaf_i in zip(grads_again, (0, 1, 3, 4), strict=True):
        assert torch.equal(gg, leaves_a[leaf_i].grad)


def test_profiler_counts_cached_blocks_as_allocations():
    x, w, e, gu, dp = big_inputs(2)
    x.requires_grad_()

    def training_forward():
        return h3fusion_ext.moe_ffn(x, w, e, gu, dp)

    training_forward()  # its blocks are now cached: the measured calls below are cache hits
    for _ in range(2):
        peak = peak_memory_mb(training_forward, "cpu")
        assert peak >= PRE_ACTIVATION_MIB, f"peak {peak:.1f} MiB misses the {PRE_ACTIVATION_MIB:.0f} MiB pre-activation"


def run_child(cache_mb: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests" / "h3fusion_ext")!r}, {str(ROOT / "tests")!r}]
        import h3fusion_ext
        from h3fusion_ext import reference
        from test_moe_ffn import make_inputs
        torch.manual_seed(0)
        x, w, e, gu, dp = make_inputs(*{tuple(SHAPE.values())!r}, torch.float32)
        x.requires_grad_()
        y = h3fusion_ext.moe_ffn(x, w, e, gu, dp)
        y.sum().backward()
        xr = x.detach().double().requires_grad_()
        reference.moe_ffn(xr, w.double(), e, gu.double(), dp.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-4, rtol=1e-4)
        print("ok")
        """
    )
    env = {**os.environ, "H3FUSION_CPU_BUFFER_CACHE_MB": cache_mb}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cache_off_still_correct():
    out = run_child("0")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("value", ["lots", "-5", "12MB"])
def test_bad_cache_size_is_a_named_error(value):
    out = run_child(value)
    assert out.returncode != 0
    assert "H3FUSION_CPU_BUFFER_CACHE_MB" in out.stderr and value in out.stderr, out.stderr[-2000:]
