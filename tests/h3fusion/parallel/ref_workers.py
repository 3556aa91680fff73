"""Per-rank body of the distributed reference log-prob test."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/h3fusion: pref_tiny


def check_split_reference_logps(rank, world, cache_dir, seed):
    """Each rank runs the reference model on about 1/world of the texts, every rank ends with all log-probs, equal
    to the single-process computation; rank 0 writes the cache, and a second call reads it without any forward."""
    from h3fusion.data.preference import build_pairs
    from h3fusion.trainers.reference_logps import precompute_reference_logps
    from pref_tiny import random_records, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    ref = tiny_llama(len(tok), hidden=16)
    items = build_pairs(random_records(5, seed=seed), mode="per_source")
    rows = []
    hook = ref.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    got = precompute_reference_logps(ref, tok, items, cache_dir=cache_dir, batch_size=3)
    mine = sum(rows)
    hook.remove()
    counts = [None] * world
    dist.all_gather_object(counts, mine)
    texts = len({(it["prompt"], it[f]) for it in items for f in ("chosen", "rejected")})
    assert sum(counts) == texts and max(counts) - min(counts) <= 1, (counts, texts)  # split, not repeated
    dist.barrier()
    # the single-process answer, computed here without the process group's split
    import h3fusion.trainers.reference_logps as rl

    real = rl._rank_and_world
    rl._rank_and_world = lambda: (0, 1)
    try:
        want = precompute_reference_logps(ref, tok, items, batch_size=3)
    finally:
        rl._rank_and_world = real
    for a, b in zip(got, want, strict=True):
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a[key], b[key])
    assert len([f for f in os.listdir(cache_dir) if f.startswith("ref_logps-")]) == 1
    ref.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("cache not used")))
    again = precompute_reference_logps(ref, tok, items, cache_dir=cache_dir, batch_size=3)
    assert again == got
