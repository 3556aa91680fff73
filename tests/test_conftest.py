"""The suite's own machinery (tests/conftest.py): replayable seeds and the low-precision tolerance rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SEED_ENV, assert_close_to_reference

CONFTEST = Path(__file__).with_name("conftest.py")
REPO = CONFTEST.parent.parent


def run_pytest(tmp_path, seed: str | None):
    """Run a one-test suite (our conftest + a test that prints a random number and fails) in a subprocess."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_draw.py").write_text(
        "import torch\n\ndef test_draw():\n    print('DRAW', torch.rand(1).item())\n    assert False\n"
    )
    env = {k: v for k, v in os.environ.items() if k != SEED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "python"), env.get("PYTHONPATH", "")])
    if seed is not None:
        env[SEED_ENV] = seed
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", str(tmp_path / "test_draw.py")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300).stdout


def drawn(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("DRAW"))


def test_seed_from_environment_is_used_and_reported_on_failure(tmp_path):
    out = run_pytest(tmp_path, "12345")
    assert f"torch seed 12345: replay with {SEED_ENV}=12345" in out
    assert drawn(out) == str(_draw(12345))


def _draw(seed: int) -> float:
    torch.manual_seed(seed)
    return torch.rand(1).item()


def test_fresh_seed_is_reported_and_replays(tmp_path):
    out = run_pytest(tmp_path, None)
    line = next(line for line in out.splitlines() if line.startswith("torch seed "))
    seed = line.split()[2].rstrip(":")
    assert drawn(out) == str(_draw(int(seed)))  # the reported seed reproduces the failing run's draws


def test_bad_seed_value_is_a_usage_error(tmp_path):
    out = run_pytest(tmp_path, "not-a-number")
    assert f"{SEED_ENV} must be an integer seed" in out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tolerance_rule_allows_one_ulp_when_pytorch_is_exact(dtype):
    # On a tiny shape PyTorch's own low-precision result can be exactly the fp64 one; ours one rounding step away
    # must still pass (it did not before the ulp floor), while a clearly wrong value must not.
    ref_fp = torch.tensor([0.3, -1.25, 2.0], dtype=torch.float64).to(dtype).double()
    ref_lowp = ref_fp.to(dtype)
    ours = ref_lowp.clone()
    ours[2] += 2 * torch.finfo(dtype).eps  # one ulp above 2.0
    assert ours[2] != ref_lowp[2]
    assert_close_to_reference(ours, ref_lowp, ref_fp, atol=0.0)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference(ours + 0.1, ref_lowp, ref_fp, atol=0.0)
