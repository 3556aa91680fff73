"""The drift regularizer under FSDP2 on 2 gloo CPU processes equals the single-process one (design.md §9)."""

from __future__ import annotations

import random

import pytest
import torch
from dist_tiny import run_ranks
from drift_workers import check_sharded_drift
from h3fusion.losses.sharded_drift import full_reference_state, is_sharded, reference_like


def test_plain_tensors_pass_through():
    p, ref = torch.randn(3, 4), torch.randn(3, 4)
    assert reference_like(ref, p) is ref
    assert not is_sharded(ref)
    out = full_reference_state({"a": ref})
    assert torch.equal(out["a"], ref)


@pytest.mark.slow
def test_fsdp2_drift_matches_single_process(tmp_path):
    run_ranks(check_sharded_drift, 2, tmp_path, random.randint(0, 10_000))
