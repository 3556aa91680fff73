"""The MoE benchmark's rows: every implementation's column and ours against both machine limits (dense `mm` FLOPs
and the unavoidable bytes against a plain read of the active experts' weights), on a tiny case.

No timing is asserted (speed is shown by the benchmark itself); the tests check the byte and FLOP accounting.
"""

from __future__ import annotations

import pytest
import torch
from h3fusion.bench import moe_bench


def test_weights_read_step_reads_exactly_the_active_experts():
    # 3 tokens, top-1 over 8 experts: at most 3 experts are active, so the read covers fewer bytes than all 8
    T, H, F, E, k = 3, 16, 8, 8, 1
    p = moe_bench.make_params(T, H, F, E, k, torch.float32, "cpu")
    read, active_bytes, all_bytes = moe_bench.weights_read_step(p)
    _, experts = moe_bench._route(moe_bench.h3fusion_ext, p)
    expert_bytes = 3 * H * F * 4
    assert all_bytes == E * expert_bytes
    assert active_bytes == len(set(experts.flatten().tolist())) * expert_bytes
    assert active_bytes <= T * expert_bytes < all_bytes
    active = sorted(set(experts.flatten().tolist()))
    expected = p["gate_up"][active].double().sum() + p["down"][active].double().sum()
    torch.testing.assert_close(read().double(), expected, rtol=1e-5, atol=1e-4)


def test_weights_read_step_reads_bf16_bytes_as_fp32_words():
    # the same bytes, half as many elements: a bf16 sum's widening would otherwise slow the read below memory's rate
    p = moe_bench.make_params(3, 16, 8, 8, 1, torch.bfloat16, "cpu")
    read, active_bytes, _ = moe_bench.weights_read_step(p)
    _, experts = moe_bench._route(moe_bench.h3fusion_ext, p)
    active = sorted(set(experts.flatten().tolist()))
    assert active_bytes == len(active) * 3 * 16 * 8 * 2
    words = [moe_bench.as_fp32_words(w[e]) for e in active for w in (p["gate_up"], p["down"])]
    assert all(w.dtype == torch.float32 for w in words)
    assert sum(w.numel() * 4 for w in words) == active_bytes
    expected = sum(w.double().sum() for w in words)
    torch.testing.assert_close(read().double(), expected, rtol=1e-5, atol=1e-3)
    odd = torch.zeros(2, 3, dtype=torch.bfloat16)  # an odd last dimension cannot be seen as fp32: read as it is
    assert moe_bench.as_fp32_words(odd) is odd


def test_unavoidable_bytes_per_mode():
    assert moe_bench.unavoidable_bytes(30, 80, "fwd") == 30
    assert moe_bench.unavoidable_bytes(30, 80, "fwd+bwd frozen") == 60  # read again by the backward
    assert moe_bench.unavoidable_bytes(30, 80, "fwd+bwd") == 140  # plus a gradient for every expert
    with pytest.raises(KeyError):
        moe_bench.unavoidable_bytes(30, 80, "bwd")


def test_collect_rows_carry_both_limits(monkeypatch):
    pytest.importorskip("transformers")
    T, H, F, E, k = 6, 16, 8, 4, 2
    monkeypatch.setattr(moe_bench, "CPU_CASES_QUICK", [(T, H, F, E, k)])
    rows = moe_bench.collect("cpu", quick=True)
    assert [(r["dtype"], r["mode"]) for r in rows] == [
        (dt, mode) for dt in ("float32", "bfloat16") for mode in moe_bench.MODES
    ]
    byte_counts = {
        str(dt).split(".")[-1]: moe_bench.weights_read_step(moe_bench.make_params(T, H, F, E, k, dt, "cpu"))[1:]
        for dt in (torch.float32, torch.bfloat16)
    }
    for r in rows:
        assert "error" not in r, r.get("error")
        for impl in ("ours",) + moe_bench.HF_IMPLS:
            assert r[f"{impl}_ms"] > 0
        best = min(r[f"{impl}_ms"] for impl in moe_bench.HF_IMPLS)
        assert r["vs_best"] == pytest.approx(best / r["ours_ms"])
        assert r["pct_of_dense"] == pytest.approx(100 * r["ours_gflops"] / r["dense_gflops"])
        assert r["pct_of_memory"] == pytest.approx(100 * r["ours_gbps"] / r["read_gbps"])
        # the bytes behind ours_gbps: the mode's unavoidable bytes in this dtype
        expected = moe_bench.unavoidable_bytes(*byte_counts[r["dtype"]], r["mode"])
        assert r["ours_gbps"] * 1e9 * r["ours_ms"] * 1e-3 == pytest.approx(expected)
