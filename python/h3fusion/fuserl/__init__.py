"""FuseRL data and training pipeline: sample from source models, score with a reward model, build FuseSFT / FusePO
data, train, report (`h3fusion sample | score | build-data | fuserl`).

Modules: records (formats, append-only JSONL), outputs (resumable output files), sampling, scoring, build,
config, pipeline, report. Heavy libraries (torch, transformers) are imported inside the functions that need them.
"""

from .build import BuildSettings, build_data, load_scored_records, split_records
from .records import load_prompts, read_jsonl_resumable
from .sampling import SampleSettings, sample_seed, sample_to_file
from .scoring import RewardModel, reward_summary, score_file

__all__ = [
    "BuildSettings",
    "RewardModel",
    "SampleSettings",
    "build_data",
    "load_prompts",
    "load_scored_records",
    "read_jsonl_resumable",
    "reward_summary",
    "sample_seed",
    "sample_to_file",
    "score_file",
    "split_records",
]
