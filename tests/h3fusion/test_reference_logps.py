"""Reference log-probs: precomputed with the reference model, cached on disk, rebuilt when the cache is corrupted."""

from __future__ import annotations

import json

import pytest
import torch
from h3fusion.data.pair_layout import REF_ITEM_FIELD
from h3fusion.data.preference import build_pairs, rloo_groups, sft_examples
from h3fusion.trainers.reference_logps import precompute_reference_logps
from h3fusion.trainers.sequence_logprobs import collate_examples, encode_example, sequence_logprobs
from pref_tiny import random_records, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


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
        for field in ("chosen", "rejected"):
            key = REF_ITEM_FIELD[field]
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


@pytest.mark.parametrize("damage", ["truncated", "not_json", "wrong_shape", "binary"])
def test_corrupted_cache_is_rebuilt_with_a_warning(damage, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    pairs = build_pairs(random_records(2, per_source=2), mode="per_source")
    good = precompute_reference_logps(model, tok, pairs, cache_dir=tmp_path)
    (path,) = tmp_path.glob("ref_logps-*.json")
    text = path.read_text()
    path.write_bytes(
        {
            "truncated": text[: len(text) // 2].encode(),
            "not_json": b"{oops",
            "wrong_shape": json.dumps({"version": 1, "logps": [1, 2]}).encode(),
            "binary": b"\xff\xfe\x00garbage",
        }[damage]
    )
    with pytest.warns(UserWarning, match=r"reference log-prob cache .*ref_logps-.*unreadable.*recomputing"):
        again = precompute_reference_logps(model, tok, pairs, cache_dir=tmp_path)
    for a, b in zip(again, good, strict=True):
        for f in ("ref_chosen_logp", "ref_rejected_logp"):
            assert a[f] == pytest.approx(b[f], rel=1e-6, abs=1e-6)
    # the rebuilt cache is whole again: the next call reads it without running the model
    assert set(json.loads(path.read_text())["logps"]) and not list(tmp_path.glob(".*tmp"))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("model ran despite a rebuilt cache"))
    assert precompute_reference_logps(model, tok, pairs, cache_dir=tmp_path) == again
