"""Multi-source records, JSONL IO, FuseSFT weighting, the pair builder and the reference log-prob cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from h3fusion.data.preference import (
    PreferenceRecord,
    build_pairs,
    load_records,
    precompute_reference_logps,
    rloo_groups,
    save_records,
    sft_examples,
)
from h3fusion.trainers.sequence_logprobs import collate_examples, encode_example, sequence_logprobs
from pref_tiny import random_records, tiny_llama, tiny_tokenizer


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
        assert it["weight"] == pytest.approx(math.exp(rewards[j] / tau) / z, rel=1e-12)
    assert sum(it["weight"] for it in items) == pytest.approx(1.0)
    assert len(sft_examples([rec])) == 5


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
    assert pairs[0]["weight"] == pytest.approx(math.exp(0.5) / za)
    assert pairs[1]["weight"] == pytest.approx(math.exp(0.25) / za)
    wide = build_pairs([rec], mode="per_source")
    assert {p["source"] for p in wide} == {"A", "B", "C"}
    assert sum(p["weight"] for p in wide) == pytest.approx(1.0)


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


def test_rloo_groups():
    recs = [_rec("p", ("a", "A", 1.0), ("b", "B", 3.0)), _rec("q", ("c", "A", 1.0))]
    (g,) = rloo_groups(recs)
    assert g["responses"] == ["a", "b"] and g["rewards"] == [1.0, 3.0] and g["weights"] == [1.0, 1.0]
    (gw,) = rloo_groups(recs, temperature=1.0)
    assert sum(gw["weights"]) == pytest.approx(2.0) and gw["weights"][1] > gw["weights"][0]


def test_reference_logps_precompute_and_cache(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    records = random_records(3, per_source=2)
    pairs = build_pairs(records, mode="per_source", target_source="target")
    groups = rloo_groups(records)
    out = precompute_reference_logps(model, tok, pairs, cache_dir=tmp_path, batch_size=3)
    assert "ref_chosen_logp" not in pairs[0]  # inputs untouched
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("ref_logps-") and files[0].suffix == ".json"
    for it in out[:3]:
        for field, key in (("chosen", "ref_chosen_logp"), ("rejected", "ref_rejected_logp")):
            b = collate_examples([encode_example(tok, it["prompt"], it[field])], tok.pad_token_id)
            with torch.no_grad():
                want = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"]).logps.item()
            assert it[key] == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert "ref_target_chosen_logp" in it

    # the second call reads the cache: the model is never run
    def boom(*a, **k):
        raise AssertionError("model ran despite a cache hit")

    monkeypatch.setattr(model, "forward", boom)
    again = precompute_reference_logps(model, tok, pairs, cache_dir=tmp_path)
    assert again == out
    monkeypatch.undo()

    # other data, or other weights, give another cache file
    g = precompute_reference_logps(model, tok, groups)
    assert len(g[0]["ref_logps"]) == len(g[0]["responses"])
    sft = precompute_reference_logps(model, tok, sft_examples(records, top_k=1), cache_dir=tmp_path)
    assert isinstance(sft[0]["ref_logp"], float)
    assert len(list(tmp_path.glob("ref_logps-*.json"))) == 2
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    precompute_reference_logps(model, tok, pairs, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ref_logps-*.json"))) == 3
    assert not list(tmp_path.glob(".*tmp"))
