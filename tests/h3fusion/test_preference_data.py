"""Multi-source records, JSONL IO, FuseSFT weighting, the pair builder, dataset-level weight normalisation."""

from __future__ import annotations

import json
import math
import struct
import warnings

import pytest
import torch
from h3fusion.data.preference import (
    PreferenceRecord,
    build_pairs,
    load_records,
    normalize_weights,
    rloo_groups,
    save_records,
    sft_examples,
)
from pref_tiny import random_records


def _rec(prompt, *responses):
    return {"prompt": prompt, "responses": [{"text": t, "source": s, "reward": r} for t, s, r in responses]}


def test_jsonl_roundtrip_and_atomic(tmp_path):
    records = random_records(5)
    path = tmp_path / "sub" / "data.jsonl"
    save_records(records, path)
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]  # no temp file left behind
    back = load_records(path)
    assert [r.to_dict() for r in back] == records
    assert isinstance(back[0], PreferenceRecord)


def test_bad_jsonl_names_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_rec("p", ("a", "s", 1.0)))
    path.write_text(good + "\n\n" + json.dumps(_rec("p", ("a", "s", "high"))) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3.*responses\[0\].*reward"):
        load_records(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: invalid JSON"):
        load_records(path)


def test_sft_weighting_topk_softmax():
    rewards = (torch.randn(5) * 2).tolist()
    rec = _rec("p", *[(f"r{j}", f"s{j}", rewards[j]) for j in range(5)])
    tau = 0.7
    items = sft_examples([rec], top_k=3, temperature=tau)
    order = sorted(range(5), key=lambda j: -rewards[j])[:3]
    assert [it["response"] for it in items] == [f"r{j}" for j in order]
    z = sum(math.exp(rewards[j] / tau) for j in order)
    for it, j in zip(items, order, strict=True):
        # softmax over the prompt's top-k, times N / prompts = 3 / 1 (dataset normalisation: mean weight 1)
        assert it["weight"] == pytest.approx(3 * math.exp(rewards[j] / tau) / z, rel=1e-12)
    assert sum(it["weight"] for it in items) / len(items) == pytest.approx(1.0, rel=1e-12)
    assert len(sft_examples([rec])) == 5


def test_sft_weights_are_normalised_over_the_dataset():
    """Prompts with different numbers of responses: each prompt carries the same total weight, the mean is 1."""
    recs = [_rec(f"p{i}", *[(f"r{i}{j}", "s", float(j)) for j in range(k)]) for i, k in enumerate((1, 2, 4, 5))]
    items = sft_examples(recs, temperature=2.0)
    n = len(items)
    assert n == 12
    assert math.fsum(it["weight"] for it in items) / n == pytest.approx(1.0, rel=1e-12)
    for i, k in enumerate((1, 2, 4, 5)):
        mine = [it for it in items if it["prompt"] == f"p{i}"]
        assert len(mine) == k and math.fsum(it["weight"] for it in mine) == pytest.approx(n / 4, rel=1e-12)
        z = sum(math.exp(j / 2.0) for j in range(k))
        for it in mine:
            assert it["weight"] == pytest.approx(n / 4 * math.exp(it["reward"] / 2.0) / z, rel=1e-12)
    unit = sft_examples(recs, top_k=1)
    assert [it["weight"] for it in unit] == [1.0] * 4  # one response per prompt: unit weights stay 1


def test_pairs_per_source_with_gap_window_and_weights():
    rec = _rec(
        "p",
        ("a1", "A", 1.0), ("a2", "A", -1.0), ("a3", "A", 0.2),  # gap 2.0
        ("b1", "B", 0.5), ("b2", "B", 0.4),  # gap 0.1
        ("c1", "C", 3.0), ("c2", "C", -3.0),  # gap 6.0
        ("d1", "D", 9.0),  # single response: no pair
    )  # fmt: skip
    pairs = build_pairs([rec], mode="per_source", gap_min=0.05, gap_max=3.0, temperature=2.0)
    assert [(p["chosen"], p["rejected"], p["source"]) for p in pairs] == [("a1", "a2", "A"), ("b1", "b2", "B")]
    za = math.exp(1.0 / 2.0) + math.exp(0.5 / 2.0)
    # softmax over the prompt's kept sources, times pairs / prompts = 2 / 1
    assert pairs[0]["weight"] == pytest.approx(2 * math.exp(0.5) / za)
    assert pairs[1]["weight"] == pytest.approx(2 * math.exp(0.25) / za)
    wide = build_pairs([rec], mode="per_source")
    assert {p["source"] for p in wide} == {"A", "B", "C"}
    assert sum(p["weight"] for p in wide) / len(wide) == pytest.approx(1.0)
    other = _rec("q", ("x1", "X", 2.0), ("x2", "X", 0.0))  # a prompt with a single pair
    both = build_pairs([rec, other], mode="per_source")
    assert sum(p["weight"] for p in both) / len(both) == pytest.approx(1.0)
    (q,) = [p for p in both if p["prompt"] == "q"]
    assert q["weight"] == pytest.approx(len(both) / 2)  # every prompt carries the same total weight


def test_pairs_global_and_target_chosen():
    rec = _rec("p", ("a1", "A", 1.0), ("b1", "B", -2.0), ("t1", "T", 0.5), ("t2", "T", 0.1))
    (p,) = build_pairs([rec], mode="global", target_source="T")
    assert (p["chosen"], p["rejected"], p["weight"], p["target_chosen"]) == ("a1", "b1", 1.0, "t1")
    assert build_pairs([rec], mode="global", gap_max=2.9) == []
    tie = _rec("p", ("x", "A", 1.0), ("y", "B", 1.0))
    assert build_pairs([tie], mode="global") == []


def test_pairs_wrpo_triplets():
    rec = _rec("p", ("a1", "A", 2.0), ("a2", "A", -3.0), ("t1", "T", 0.5), ("t2", "T", -1.0), ("t3", "T", 0.0))
    (p,) = build_pairs([rec], mode="wrpo", target_source="T")
    assert (p["chosen"], p["target_chosen"], p["rejected"]) == ("a1", "t1", "t2")
    assert (p["chosen_reward"], p["target_chosen_reward"], p["rejected_reward"]) == (2.0, 0.5, -1.0)
    one_target = _rec("p", ("a1", "A", 2.0), ("a2", "A", -3.0), ("t1", "T", 0.5))
    (q,) = build_pairs([one_target], mode="wrpo", target_source="T")
    assert (q["chosen"], q["target_chosen"], q["rejected"]) == ("a1", "t1", "a2")
    assert build_pairs([rec], mode="wrpo", target_source="T", gap_min=2.0) == []
    with pytest.raises(ValueError, match="target_source"):
        build_pairs([rec], mode="wrpo")
    with pytest.raises(ValueError, match="mode"):
        build_pairs([rec], mode="best")


@pytest.mark.parametrize("mode", ["wrpo", "per_source", "global"])
def test_missing_target_source_is_named_with_the_sources_present(mode):
    rec = _rec("p", ("a1", "A", 2.0), ("a2", "A", -3.0), ("t1", "T", 0.5), ("t2", "T", -1.0))
    with pytest.raises(ValueError, match=r"target_source 'target' has no responses.*sources present: \['A', 'T'\]"):
        build_pairs([rec], mode=mode, target_source="target")


def test_rloo_groups():
    recs = [_rec("p", ("a", "A", 1.0), ("b", "B", 3.0)), _rec("q", ("c", "A", 1.0))]
    (g,) = rloo_groups(recs)
    assert g["responses"] == ["a", "b"] and g["rewards"] == [1.0, 3.0] and g["weights"] == [1.0, 1.0]
    (gw,) = rloo_groups(recs, temperature=1.0)
    assert sum(gw["weights"]) == pytest.approx(2.0) and gw["weights"][1] > gw["weights"][0]
    assert gw["weights"][1] == pytest.approx(2 * math.exp(3.0) / (math.exp(1.0) + math.exp(3.0)), rel=1e-12)


def test_normalize_weights():
    items = [{"prompt": "p", "weight": w} for w in (0.5, 1.5, 4.0, 0.0)]
    out = normalize_weights(items)
    assert [it["weight"] for it in out] == pytest.approx([0.5 / 1.5, 1.0, 4.0 / 1.5, 0.0])
    assert items[0]["weight"] == 0.5  # inputs untouched
    assert [it["weight"] for it in normalize_weights([{"prompt": "p"}] * 3)] == [1.0, 1.0, 1.0]
    groups = normalize_weights([{"weights": [1.0, 3.0]}, {"weights": [2.0, 2.0, 2.0]}])
    assert math.fsum(w for g in groups for w in g["weights"]) == pytest.approx(5.0)
    # a subset (e.g. a train split) of a normalised list is normalised again over itself
    pairs = build_pairs(random_records(6), mode="per_source", temperature=0.3)
    half = normalize_weights(pairs[: len(pairs) // 2])
    assert sum(p["weight"] for p in half) / len(half) == pytest.approx(1.0)
    assert normalize_weights([]) == []
    with pytest.raises(ValueError, match="all weights are 0"):
        normalize_weights([{"weight": 0.0}])
    with pytest.raises(ValueError, match=r"items\[1\]"):
        normalize_weights([{"weight": 1.0}, {"weight": -1.0}])


def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def test_tiny_temperature_drops_zero_weights_and_keeps_the_rest():
    """fp32 softmax(r / 0.02) of rewards 3 apart is exp(-150) = 0: such responses are dropped (counted in a warning),
    the others keep weights that are non-zero in float32 and average to 1."""
    recs = [_rec(f"p{i}", ("best", "A", 2.0), ("close", "B", 1.999), ("far", "C", -1.0)) for i in range(3)]
    with pytest.warns(UserWarning, match=r"sft_examples: dropped 3 of 9 responses whose weight"):
        items = sft_examples(recs, temperature=0.02)
    assert sorted({it["response"] for it in items}) == ["best", "close"]
    assert all(_fp32(it["weight"]) > 0 for it in items)
    assert math.fsum(it["weight"] for it in items) / len(items) == pytest.approx(1.0, rel=1e-12)
    # float32 softmax, what the old code's weights became in a batch: exact zeros
    assert torch.softmax(torch.tensor([2.0, 1.999, -1.0]) / 0.02, 0)[2].item() == 0.0
    # a weight tiny but non-zero in float64 and zero in float32 is dropped too
    tiny = [_rec("q", ("a", "A", 0.0), ("b", "B", -2.1))]  # exp(-105) ~ 2.5e-46 < float32's smallest subnormal
    with pytest.warns(UserWarning, match=r"dropped 1 of 2"):
        assert [it["response"] for it in sft_examples(tiny, temperature=0.02)] == ["a"]
    per_source = [_rec("p", ("a1", "A", 5.0), ("a2", "A", 0.0), ("b1", "B", 1.0), ("b2", "B", 0.0))]
    with pytest.warns(UserWarning, match=r"build_pairs: dropped 1 of 2 pairs"):
        (pair,) = build_pairs(per_source, mode="per_source", temperature=0.02)
    assert pair["source"] == "A" and pair["weight"] == 1.0
    # RLOO keeps zero-weight responses: their rewards are the others' baseline
    (g,) = rloo_groups(recs[:1], temperature=0.02)
    assert len(g["responses"]) == 3 and g["weights"][2] == 0.0 and sum(g["weights"]) == pytest.approx(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sft_examples(recs, temperature=1.0)  # nothing dropped, no warning
    with pytest.raises(ValueError, match="temperature"):
        sft_examples(recs, temperature=0.0)


def test_load_records_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(_rec("caf\u00e9", ("a", "s", 1.0)), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl: not a UTF-8 text file \(byte 0xe9"):
        load_records(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no records"):
        load_records(empty)
    assert load_records(empty, allow_empty=True) == []


def test_extreme_temperatures_stay_finite():
    rec = _rec("p", ("a", "A", 2.0), ("b", "B", -2.0), ("c", "C", 2.0))
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        cold = sft_examples([rec], temperature=1e-308)  # r / tau overflows float64; the gaps do not
    assert [it["weight"] for it in cold] == [1.0, 1.0]  # the two best share it; mean 1
    hot = sft_examples([rec], temperature=1e300)
    assert [it["weight"] for it in hot] == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sft_examples([rec], temperature=bad)
