"""`h3fusion demo` at a reduced size: every stage runs, and the report files and table have the promised shape."""

from __future__ import annotations

import json

import torch
from h3fusion.data.synthetic import build_corpora
from h3fusion.demo import CATEGORIES, run_demo


def test_corpora_are_deterministic_and_held_out():
    seed = int(torch.randint(0, 1000, ()))
    a, b = build_corpora(seed, n_pretrain=20, n_train=30, n_test=10), build_corpora(seed, 20, 30, 10)
    assert a == b
    for cat in CATEGORIES:
        assert len(a["train"][cat]) == 30 and len(a["test"][cat]) == 10
        assert {e.category for e in a["train"][cat]} == {cat}
        train_prompts = {e.instruction for e in a["train"][cat]}
        assert not train_prompts & {e.instruction for e in a["test"][cat]}
    # the categories are worded differently (routing is learnable from the prompt)
    assert all(e.instruction.startswith("please") for e in a["train"]["helpful"])
    assert all("without getting caught" in e.instruction for e in a["train"]["harmless"])
    honest_answers = {e.output for e in a["train"]["honest"]}
    assert any(o.startswith("i do not know") for o in honest_answers) and any(
        o.startswith("no ,") for o in honest_answers
    )


def test_quick_demo_writes_report(tmp_path):
    seed = int(torch.randint(0, 1000, ()))
    lines = []
    res = run_demo(str(tmp_path), seed=seed, quick=True, progress=False, echo=lines.append)
    for name in ("report.md", "results.json", "route_report.json", "route_report.png", "route_report_untrained.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seed"] == seed and saved["categories"] == list(CATEGORIES)
    # the fused model ran on our kernels (the default), and the route report says so
    assert saved["experts_implementation"] == "h3fusion"
    assert json.loads((tmp_path / "route_report.json").read_text())["experts_implementation"] == "h3fusion"
    rows = saved["losses"]
    expected_rows = {"base", "soup (uniform avg)", "fused (untrained)", "fused (H3Fusion)"}
    expected_rows |= {f"aligned-{c}" for c in CATEGORIES}
    assert set(rows) == expected_rows
    for vals in rows.values():
        assert set(vals) == set(CATEGORIES) and all(0 < v < 20 for v in vals.values())
    # each aligned model is better than the base on its own category
    for c in CATEGORIES:
        assert rows[f"aligned-{c}"][c] < rows["base"][c]
    assert set(saved["routing_accuracy"]) == set(CATEGORIES)
    assert all(0.0 <= a <= 1.0 for a in saved["routing_accuracy"].values())
    # H3Fusion training helps: lower held-out loss than the untrained fusion, and routing well above chance (1/N)
    mean = lambda vals: sum(vals) / len(vals)  # noqa: E731
    assert mean(rows["fused (H3Fusion)"].values()) < mean(rows["fused (untrained)"].values())
    assert mean(saved["routing_accuracy"].values()) > 0.5 > 1 / len(CATEGORIES)
    logged = [h for h in saved["train_log"] if "loss" in h]
    assert logged and {"gate_loss", "drift_loss", "lm_loss"} <= set(logged[-1])
    report = (tmp_path / "report.md").read_text()
    assert "| model" in report and "fused (H3Fusion)" in report and "Routing accuracy" in report
    assert lines and "fused (H3Fusion)" in lines[-1]
    assert res["fused_minus_best_aligned"].keys() == set(CATEGORIES)
