"""The benchmark runner and `h3fusion bench`: tables, JSON report, skipping absent modules, the CPU memory measure.

No timing is asserted (speed is shown by the benchmarks themselves); a fake bench module keeps this fast.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from h3fusion.bench import runner as bench_run
from h3fusion.bench.common import format_table, peak_memory_mb, time_fn


@pytest.fixture
def fake_benches(monkeypatch):
    module = types.ModuleType("fake_bench_for_tests")
    module.collect = lambda device, quick: [
        {
            "bench": "fake",
            "case": "c1",
            "impl": "ours",
            "mode": "fwd",
            "median_ms": 1.5,
            "tflops": 0.25,
            "speedup_vs_reference": 2.0,
        },
        {"bench": "fake", "case": "c1", "impl": "reference", "mode": "fwd", "median_ms": 3.0, "tflops": 0.125},
    ]
    monkeypatch.setitem(sys.modules, "fake_bench_for_tests", module)
    benches = {"fake": "fake_bench_for_tests", "absent": "h3fusion.bench.absent_x"}
    monkeypatch.setattr(bench_run, "BENCH_MODULES", benches)


def test_runner_writes_report_and_skips_absent_modules(fake_benches, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench_run.main(["--device", "cpu", "--only", "fake,absent", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "date", "results"} <= set(report)
    assert report["torch"] == torch.__version__
    assert [r["impl"] for r in report["results"]["fake"]] == ["ours", "reference"]
    assert "absent" not in report["results"]
    printed = capsys.readouterr().out
    assert "[fake]" in printed and "speedup_vs_reference" in printed and "skipped" in printed


def test_runner_rejects_unknown_bench(fake_benches, tmp_path):
    assert bench_run.main(["--device", "cpu", "--only", "nope", "--out", str(tmp_path / "r.json")]) == 2


def test_h3fusion_bench_subcommand(fake_benches, tmp_path):
    from h3fusion.cli import main

    out = tmp_path / "cli.json"
    assert main(["bench", "--device", "cpu", "--only", "fake", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["fake"][0]["median_ms"] == 1.5


def test_cpu_peak_memory_sees_a_temporary():
    n = 4 * 2**20  # 16 MiB of float32, freed before the call returns
    peak = peak_memory_mb(lambda: float(torch.ones(n).sum()), "cpu")
    assert 15.9 <= peak < 64


def test_time_fn_and_table():
    stats = time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), "cpu", warmup=1, repeats=4)
    assert stats["repeats"] == 4 and stats["q20_ms"] <= stats["median_ms"] <= stats["q80_ms"]
    table = format_table([{"a": 1.23456, "b": None}, {"a": 12345.0, "b": "x"}], ["a", "b"])
    assert table.splitlines()[2].split() == ["1.23", "-"] and table.splitlines()[3].split() == ["12345", "x"]


def test_time_interleaved_times_a_slow_implementation_by_its_first_call():
    import time

    from h3fusion.bench.common import time_interleaved

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.05)

    out = time_interleaved({"fast": fast, "slow": slow}, "cpu", warmup=2, repeats=4, min_repeats=4, single_call_s=0.02)
    assert out["slow"]["repeats"] == 1 and out["slow"]["single_call"] and out["slow"]["median_ms"] >= 50
    assert calls["slow"] == 1  # neither a second warm-up nor timed calls
    assert out["fast"]["repeats"] == 4 and "single_call" not in out["fast"] and calls["fast"] == 6


def test_time_interleaved_stops_alternating_an_implementation_far_slower_than_the_fastest():
    import time

    from h3fusion.bench.common import time_interleaved

    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    fns = {"fast": sleeper(0.01), "peer": sleeper(0.012), "slow": sleeper(0.3)}
    out = time_interleaved(fns, "cpu", warmup=1, repeats=6, min_repeats=3, budget_s=0.5, slow_factor=10.0)
    # the slow one (30x) keeps its min_repeats calls; the others alternate on to `repeats`, its time not counting
    # against their budget
    assert out["slow"]["repeats"] == 3 and out["slow"]["median_ms"] >= 300
    assert out["fast"]["repeats"] == 6 and out["peer"]["repeats"] == 6
    # without the cut, the slow one's calls spend the budget: every implementation stops at min_repeats
    out = time_interleaved(fns, "cpu", warmup=1, repeats=6, min_repeats=3, budget_s=0.5, slow_factor=None)
    assert {v["repeats"] for v in out.values()} == {3}
