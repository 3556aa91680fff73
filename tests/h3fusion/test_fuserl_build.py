"""`h3fusion build-data`: the seeded split, the items it builds, counts, and records that yield nothing."""

from __future__ import annotations

import json
import math

import pytest
from fuserl_tiny import read_jsonl
from h3fusion.cli import main
from h3fusion.data.preference import build_pairs, load_records, rloo_groups, sft_examples
from h3fusion.fuserl.build import BuildSettings, build_data, load_scored_records, split_records


def _r(source, reward, text=None):
    return {"source": source, "text": text or f"{source} {reward}", "reward": reward}


def _records():
    return [
        # per source: a gap 0.05 (in [0.01, 0.1]) for alpha, 0.5 for beta (outside) -> one pair
        {"id": 0, "prompt": "p0", "responses": [_r("alpha", 1.0), _r("alpha", 0.95), _r("beta", 0.0), _r("beta", 0.5)]},
        # every gap outside the window -> no pair
        {"id": 1, "prompt": "p1", "responses": [_r("alpha", 1.0), _r("alpha", 2.0), _r("beta", 0.0), _r("beta", 0.0)]},
        # two pairs
        {
            "id": 2,
            "prompt": "p2",
            "responses": [_r("alpha", 0.1), _r("alpha", 0.15), _r("beta", 0.3), _r("beta", 0.32)],
        },
        # a single response -> no pair
        {"id": 3, "prompt": "p3", "responses": [_r("alpha", 0.1)]},
    ]


def test_split_is_seeded_and_follows_the_ratio():
    recs = [{"id": i} for i in range(10)]
    sft, po = split_records(recs, 0.4, seed=3)
    assert len(sft) == 4 and len(po) == 6
    assert sorted(r["id"] for r in sft + po) == list(range(10))
    assert [r["id"] for r in sft] == sorted(r["id"] for r in sft)  # input order kept
    assert split_records(recs, 0.4, seed=3) == (sft, po)
    assert any(split_records(recs, 0.4, seed=s)[0] != sft for s in range(4, 10))
    assert split_records(recs, 0.0, seed=1) == ([], recs) and split_records(recs, 1.0, seed=1) == (recs, [])


def test_per_source_pairs_counts_and_skipped_records(tmp_path):
    s = BuildSettings(sft_ratio=0.0, mode="per_source", gap_min=0.01, gap_max=0.1)
    stats = build_data(_records(), tmp_path, s)
    pairs = read_jsonl(tmp_path / "po_items.jsonl")
    expected = build_pairs(_records(), mode="per_source", gap_min=0.01, gap_max=0.1)
    assert pairs == json.loads(json.dumps(expected))
    assert [p["prompt"] for p in pairs] == ["p0", "p2", "p2"]
    assert stats["po_items"] == 3 and stats["po_records"] == 4 and stats["sft_items"] == 0
    assert stats["po_items_per_source"] == {"alpha": 2, "beta": 1}
    assert stats["mean_pair_reward_gap"] == pytest.approx((0.05 + 0.05 + 0.02) / 3)
    skipped = read_jsonl(tmp_path / "skipped_records.jsonl")
    assert [(x["id"], x["split"]) for x in skipped] == [(1, "po"), (3, "po")]
    assert skipped[0]["reward_gaps"] == {"alpha": 1.0, "beta": 0.0} and "[0.01, 0.1]" in skipped[0]["reason"]
    assert skipped[1]["responses_per_source"] == {"alpha": 1}
    assert stats["skipped_po_records"] == 2
    # the split records are valid trainer input
    assert [r.prompt for r in load_records(tmp_path / "po_records.jsonl")] == ["p0", "p1", "p2", "p3"]
    assert json.loads((tmp_path / "stats.json").read_text())["po_items"] == 3


def test_global_pairs(tmp_path):
    stats = build_data(_records(), tmp_path, BuildSettings(sft_ratio=0.0, mode="global", gap_min=0.0, gap_max=1.5))
    pairs = read_jsonl(tmp_path / "po_items.jsonl")
    assert pairs == json.loads(json.dumps(build_pairs(_records(), mode="global", gap_min=0.0, gap_max=1.5)))
    # p0: 1.0 vs 0.0; p1: gap 2.0 > 1.5; p2: 0.32 vs 0.1; p3: one response
    assert [(p["prompt"], p["chosen_reward"], p["rejected_reward"]) for p in pairs] == [("p0", 1.0, 0.0),
                                                                                      ("p2", 0.32, 0.1)]  # fmt: skip
    skipped = read_jsonl(tmp_path / "skipped_records.jsonl")
    assert [x["id"] for x in skipped] == [1, 3] and stats["po_items"] == 2
    assert "gap 2 is not > 0 and within [0, 1.5]" in skipped[0]["reason"] and skipped[1]["reason"] == "1 response(s)"


def test_sft_topk_weighting_and_wrpo_and_rloo(tmp_path):
    recs = _records()
    s = BuildSettings(
        sft_ratio=0.5,
        seed=1,
        top_k=2,
        sft_temperature=0.5,
        mode="wrpo",
        target_source="beta",
        gap_min=0.0,
        gap_max=math.inf,
    )
    stats = build_data(recs, tmp_path, s)
    sft, po = split_records(recs, 0.5, 1)
    items = read_jsonl(tmp_path / "sft_items.jsonl")
    assert items == json.loads(json.dumps(sft_examples(sft, top_k=2, temperature=0.5)))
    assert stats["sft_items"] == sum(min(2, len(r["responses"])) for r in sft)
    triplets = read_jsonl(tmp_path / "po_items.jsonl")
    assert triplets == json.loads(json.dumps(build_pairs(po, mode="wrpo", target_source="beta")))
    assert all("target_chosen" in t for t in triplets)
    skipped = {x["id"]: x for x in read_jsonl(tmp_path / "skipped_records.jsonl")}
    for rec in po:
        assert (rec["id"] in skipped) == (not build_pairs([rec], mode="wrpo", target_source="beta"))
    if 3 in skipped:
        assert "no response from the target source 'beta'" in skipped[3]["reason"]
    out = tmp_path / "rloo"
    out.mkdir()
    stats = build_data(recs, out, BuildSettings(sft_ratio=0.0, mode="rloo", rloo_temperature=1.0))
    assert read_jsonl(out / "po_items.jsonl") == json.loads(json.dumps(rloo_groups(recs, temperature=1.0)))
    assert stats["po_items"] == 3 and [x["id"] for x in read_jsonl(out / "skipped_records.jsonl")] == [3]


def test_bad_settings_and_malformed_scored_records(tmp_path):
    with pytest.raises(ValueError, match="needs target_source"):
        BuildSettings(mode="wrpo").validate()
    with pytest.raises(ValueError, match="sft_ratio"):
        BuildSettings(sft_ratio=1.5).validate()
    path = tmp_path / "scored.jsonl"
    path.write_text(
        json.dumps(_records()[0])
        + "\n"
        + json.dumps({"prompt": "x", "responses": [{"source": "a", "text": "t"}]})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"scored\.jsonl:2\.responses\[0\]: 'reward' must be a finite number"):
        load_scored_records(path)


def test_build_data_cli(tmp_path, capsys):
    inp = tmp_path / "scored.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    out = tmp_path / "data"
    args = [
        "build-data",
        "--in",
        str(inp),
        "--out",
        str(out),
        "--sft-ratio",
        "0.25",
        "--gap-min",
        "0.01",
        "--gap-max",
        "0.1",
        "--seed",
        "2",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    assert stats["sft_records"] == 1 and stats["po_records"] == 3
    assert "skipped_records.jsonl" in captured.err or stats["skipped_po_records"] == 0
    assert main(args) == 2  # a previous output: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        main([*args[:-2], "--sft-ratio", "2"])
