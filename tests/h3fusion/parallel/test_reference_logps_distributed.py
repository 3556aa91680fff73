"""The reference log-prob precompute under torch.distributed: split over 2 gloo ranks, gathered once (design.md §9)."""

from __future__ import annotations

import random

import pytest
from dist_tiny import run_ranks


@pytest.mark.slow
def test_reference_logps_split_over_ranks_and_gathered_once(tmp_path):
    from ref_workers import check_split_reference_logps

    cache = tmp_path / "cache"
    cache.mkdir()
    run_ranks(check_split_reference_logps, 2, tmp_path, str(cache), random.randint(0, 10_000))
