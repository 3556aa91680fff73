"""The fusion benchmark in quick mode: synthetic inputs, child-process runs, memory sampling, table + JSON, the
streamed and in-memory outputs identical, mergekit skipped with a reason when absent; the child memory measure."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from h3fusion.bench import fusion_bench
from h3fusion.bench import runner as bench_run


def _tensors(folder):
    from safetensors import safe_open

    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_quick_fusion_bench(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "report.json"
    argv = ["--quick", "--in-memory", "--mergekit", str(tmp_path / "no-mergekit"), "--max-shard-size", "100KB",
            "--workdir", str(tmp_path / "w"), "--keep", "--out", str(out)]  # fmt: skip
    assert fusion_bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[fusion]" in printed and "peak_anon_gb" in printed and "skipped (not found" in printed
    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"mergekit-moe", "baseline: import only", "h3fusion fuse (streamed)",
                         "fuse_models + save_fused_model"}  # fmt: skip
    assert rows["mergekit-moe"]["error"].startswith("skipped")
    streamed, in_memory = rows["h3fusion fuse (streamed)"], rows["fuse_models + save_fused_model"]
    for row in (streamed, in_memory):
        assert row["returncode"] == 0 and row["check"] == "ok", row
        assert row["wall_s"] > 0 and row["read_gbps"] > 0 and row["write_gbps"] > 0
        # the sampled anonymous and file-mapped peaks are real and within the kernel's peak RSS
        assert 0 < row["peak_anon_gb"] <= row["peak_rss_gb"] and 0 < row["peak_file_gb"] <= row["peak_rss_gb"]
        assert row["samples"] > 10
        assert row["anon_vs_layer_experts"] == pytest.approx(row["peak_anon_gb"] / report["layer_experts_gb"])
    assert streamed["output_gb"] == in_memory["output_gb"] > 0
    shape = fusion_bench.SHAPES["quick"]
    assert report["layer_experts_gb"] * 1e9 == 3 * 3 * shape["hidden"] * shape["intermediate"] * 2
    assert report["input_gb"] * 1e9 == sum(
        os.path.getsize(tmp_path / "w" / d / f)
        for d in ("in-a", "in-b", "in-c")
        for f in os.listdir(tmp_path / "w" / d)
        if f.endswith(".safetensors")
    )
    # both runs fused the same inputs with the same seed: the same checkpoint, sharded, loadable
    a = tmp_path / "w" / "out-h3fusion-fuse--streamed-"
    b = tmp_path / "w" / "out-fuse-models---save-fused-model"
    assert (a / "model.safetensors.index.json").is_file()
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.num_local_experts == 3 and model.dtype == torch.bfloat16


def test_measure_child_separates_anonymous_from_file_pages(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(64 * 2**20))
    anon = "b = bytearray(160 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.3)"
    mapped = (f"import mmap, time; f = open({str(blob)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); "
              "s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(0.3)")  # fmt: skip
    a = fusion_bench.measure_child([sys.executable, "-c", anon])
    m = fusion_bench.measure_child([sys.executable, "-c", mapped])
    assert a["returncode"] == 0 and m["returncode"] == 0
    assert a["peak_anon_bytes"] >= 160 * 2**20 and a["peak_rss_bytes"] >= a["peak_anon_bytes"]
    assert m["peak_file_bytes"] >= 64 * 2**20 and m["peak_anon_bytes"] < 64 * 2**20
    assert fusion_bench.measure_child([sys.executable, "-c", "raise SystemExit(3)"])["returncode"] == 3


def test_runner_runs_fusion_only_when_named(monkeypatch, tmp_path, capsys):
    assert "fusion" in bench_run.BENCH_MODULES and "fusion" not in bench_run.DEFAULT_BENCHES
    seen = {}

    def fake_run_bench(args):
        seen["quick"] = args.quick
        return {"shape": {"hidden": 64, "layers": 2}, "results": [{"impl": "h3fusion fuse (streamed)", "wall_s": 1.0,
                                                                   "peak_anon_gb": 0.4}]}  # fmt: skip

    monkeypatch.setattr(fusion_bench, "run_bench", fake_run_bench)
    out = tmp_path / "r.json"
    assert bench_run.main(["--device", "cpu", "--only", "fusion", "--quick", "--out", str(out)]) == 0
    assert seen == {"quick": True}
    assert json.loads(out.read_text())["results"]["fusion"][0]["case"] == "64h x 2L"
    assert "peak_anon_gb" in capsys.readouterr().out
