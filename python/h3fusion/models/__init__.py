"""h3fusion.models."""

from .fuse import fuse_models, save_fused_model  # noqa: F401
from .fuse_stream import fuse_to_disk  # noqa: F401
from .hf_experts import (  # noqa: F401
    EXPERTS_IMPLEMENTATIONS,
    current_experts_implementation,
    register_experts_implementation,
    register_lazily,
    replace_moe_blocks,
    restore_moe_blocks,
    set_experts_implementation,
)
from .lora_experts import LoRAExperts, merge_lora_experts  # noqa: F401
from .moe_block import H3FusionMoE  # noqa: F401
from .shared_format import load_fused_model  # noqa: F401

# "h3fusion" joins transformers' ExpertsInterface as soon as transformers loads it (cheap: no import here).
register_lazily()
