"""Expert parallelism on 2 and 4 gloo CPU processes equals the single-process layer and training run (design.md §9)."""

from __future__ import annotations

import random

import pytest
import torch
from dist_tiny import run_ranks
from ep_workers import check_all
from h3fusion.parallel import expert_partition


def test_expert_partition_contiguous_blocks():
    assert expert_partition(3, 2) == [(0, 2), (2, 3)]
    assert expert_partition(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="num_experts=2 < expert-parallel group size 3"):
        expert_partition(2, 3)


def test_convert_needs_an_initialised_process_group():
    from h3fusion.models.moe_block import H3FusionMoE
    from h3fusion.parallel import convert_to_expert_parallel

    with pytest.raises(RuntimeError, match="not initialised"):
        convert_to_expert_parallel(H3FusionMoE(4, 4, 2, 1))


@pytest.mark.slow
def test_two_ranks_uneven_experts_match_single_process(tmp_path):
    # 3 experts over 2 ranks (2 + 1), one rank without tokens in the layer check
    run_ranks(check_all, 2, tmp_path, 2, 3, random.randint(0, 10_000))


@pytest.mark.slow
def test_four_ranks_expert_parallel_inside_data_parallel(tmp_path):
    # DP over 4 ranks, two EP groups of 2 ({0,1}, {2,3}), expert-data-parallel groups {0,2}, {1,3}; GeGLU experts
    run_ranks(check_all, 4, tmp_path, 2, 4, random.randint(0, 10_000), "gelu_pytorch_tanh")


def test_torch_has_gloo_all_to_all():
    assert torch.distributed.is_gloo_available()
