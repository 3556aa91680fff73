"""The LoRA bench in quick mode: PEFT's path and ours compute the same function on the same factors (so the timing
compares like with like), every row has its measurements, and the shared layout keeps less FFN weight memory."""

from __future__ import annotations

import pytest
from h3fusion.bench import lora_bench

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("peft")


def test_quick_rows():
    rows = lora_bench.collect("cpu", quick=True)
    lora = [r for r in rows if r["mode"] == "fwd+bwd frozen base"]
    shared = [r for r in rows if r["impl"] in ("shared", "materialised")]
    assert [r["impl"] for r in lora] == ["ours (LoRAExperts)", "PEFT target_parameters (grouped_mm)"]
    assert not any("error" in r for r in rows), rows
    assert all(r["median_ms"] > 0 and r["peak_mem_mb"] >= 0 for r in lora)
    assert lora[0]["max_abs_diff"] < 1e-4 and lora[0]["speedup_vs_peft"] > 0
    assert [(r["impl"], r["mode"]) for r in shared] == [
        ("shared", "fwd"),
        ("materialised", "fwd"),
        ("shared", "fwd+bwd"),
        ("materialised", "fwd+bwd"),
    ]
    T, H, F, E, k, r = lora_bench.QUICK_SHARED_CASES[0]
    mb = 4 / 2**20
    assert shared[0]["weight_mem_mb"] == pytest.approx((3 * H * F + E * r * (2 * H + 3 * F)) * mb, abs=0.01)
    assert shared[1]["weight_mem_mb"] == pytest.approx(E * 3 * H * F * mb, abs=0.01)
    assert 0 < shared[0]["mem_vs_materialized"] < 1
