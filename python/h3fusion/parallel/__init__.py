"""Multi-process training pieces: expert parallelism (design.md §9)."""

from .convert import convert_to_expert_parallel
from .expert_parallel import ExpertParallelExperts, HFExpertParallelExperts, expert_parallel_ffn, expert_partition
from .groups import (
    build_expert_parallel_groups,
    expert_parameter_names,
    full_state_dict,
    ignore_expert_parameters_in_ddp,
    sync_expert_gradients,
)

__all__ = [
    "ExpertParallelExperts",
    "HFExpertParallelExperts",
    "build_expert_parallel_groups",
    "convert_to_expert_parallel",
    "expert_parallel_ffn",
    "expert_parameter_names",
    "expert_partition",
    "full_state_dict",
    "ignore_expert_parameters_in_ddp",
    "sync_expert_gradients",
]
