"""h3fusion.data.pair_layout: the one row layout of pair batches, shared by the collator and the trainers."""

from __future__ import annotations

import pytest
import torch
from h3fusion.data.pair_layout import REF_BATCH_KEY, REF_ITEM_FIELD, pair_fields, split_pair_rows
from h3fusion.data.preference import build_pairs
from h3fusion.trainers.preference_common import PreferenceCollator
from h3fusion.trainers.sequence_logprobs import encode_example
from pref_tiny import random_records, tiny_tokenizer


def test_split_pair_rows():
    rows = torch.arange(12)
    parts = split_pair_rows(rows, 4, with_target=True)
    assert list(parts) == ["chosen", "rejected", "target_chosen"] == list(pair_fields(True))
    assert parts["rejected"].tolist() == [4, 5, 6, 7] and parts["target_chosen"].tolist() == [8, 9, 10, 11]
    assert list(split_pair_rows(rows[:8], 4, with_target=False)) == ["chosen", "rejected"]
    with pytest.raises(ValueError, match="has 8 rows, got 12"):
        split_pair_rows(rows, 4, with_target=False)


@pytest.mark.parametrize("with_target", [False, True])
def test_collator_rows_follow_the_layout(with_target):
    tok = tiny_tokenizer()
    pairs = build_pairs(random_records(3), mode="wrpo" if with_target else "per_source", target_source="target")
    pairs = [{**p, **{REF_ITEM_FIELD[f]: float(i + 10 * j) for j, f in enumerate(pair_fields(True))}}
             for i, p in enumerate(pairs)]  # fmt: skip
    batch = PreferenceCollator(tok, "pair", with_target=with_target)(pairs)
    p = len(pairs)
    ids = split_pair_rows(batch["input_ids"], p, with_target)
    for f in pair_fields(with_target):
        for i, it in enumerate(pairs):
            want = encode_example(tok, it["prompt"], it[f])["input_ids"]
            assert ids[f][i, : len(want)].tolist() == want
        assert batch[REF_BATCH_KEY[f]].tolist() == [float(i + 10 * pair_fields(True).index(f)) for i in range(p)]
    assert ("ref_target_chosen_logps" in batch) == with_target
