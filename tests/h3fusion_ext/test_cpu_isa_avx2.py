"""The AVX2 paths of the CPU kernels on any x86 machine. Without AVX-512 the row passes and small/mid GEMMs run on
8-lane vectors and bf16 GEMMs above 8 rows are widened to fp32 (no VDPBF16PS tiles); `H3FUSION_CPU_ISA=avx2` makes an
AVX-512 CPU run those same paths, and the moe_ffn and small-GEMM reference tests run again in a child process under
it. On an AVX2-only CPU (where the plain run already takes these paths) the child repeats them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run_child(args: list[str], isa: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "H3FUSION_CPU_ISA": isa}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_kernels_capped_at_avx2_match_reference():
    files = [str(HERE / name) for name in ("test_moe_small_gemm.py", "test_moe_ffn.py", "test_moe_lora_ffn.py")]
    out = run_child(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files], "avx2")
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    passed = [line for line in out.stdout.splitlines() if " passed" in line]
    assert passed and int(passed[-1].split(" passed")[0].split()[-1]) >= 40, tail


@pytest.mark.parametrize("op", ["moe_ffn", "moe_lora_ffn"])
def test_bad_isa_value_is_an_error_naming_the_variable(op):
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}, {str(ROOT / "tests")!r}]
        import h3fusion_ext
        from test_moe_ffn import make_inputs
        x, w, e, gu, dp = make_inputs(16, 32, 24, 4, 2, torch.float32)
        try:
            if {op!r} == "moe_ffn":
                h3fusion_ext.moe_ffn(x, w, e, gu, dp)
            else:
                E, r = gu.shape[0], 2
                from h3fusion_ext.moe_lora import moe_lora_ffn
                moe_lora_ffn(x, w, e, gu, dp, torch.zeros(E, r, 32), torch.zeros(E, 48, r),
                             torch.zeros(E, r, 24), torch.zeros(E, 32, r), 1.0)
        except RuntimeError as err:
            print("error:", err)
        """
    )
    out = run_child(["-c", code], "avx512", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "error:" in out.stdout and "H3FUSION_CPU_ISA" in out.stdout and "avx512" in out.stdout, out.stdout
