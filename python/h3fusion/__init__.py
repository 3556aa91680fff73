"""h3fusion: fuse aligned LLMs into a mixture of experts (H3Fusion) and train with reward-weighted preference
fusion (FuseSFT / FusePO), on the h3fusion_ext kernels.

Each feature module adds its public names below (keep this file a list of imports).
"""

__version__ = "0.1.0"

from .data.instructions import (  # noqa: F401
    InstructionCollator,
    InstructionDataset,
    InstructionExample,
    load_instructions,
)
from .data.preference import (  # noqa: F401
    build_pairs,
    load_records,
    precompute_reference_logps,
    rloo_groups,
    save_records,
    sft_examples,
)
from .losses.gating import (  # noqa: F401
    drift_regularization,
    gating_loss,
    load_balancing_loss,
)
from .losses.preference import (  # noqa: F401
    rloo_loss,
    simpo_loss,
    weighted_dpo_loss,
    weighted_sft_loss,
    wrpo_alpha,
    wrpo_loss,
)
from .models import (  # noqa: F401  (importing .models registers "h3fusion" with transformers' experts interface)
    H3FusionMoE,
    current_experts_implementation,
    fuse_models,
    register_experts_implementation,
    replace_moe_blocks,
    restore_moe_blocks,
    save_fused_model,
    set_experts_implementation,
)
from .route_report import route_report  # noqa: F401
from .trainers.fuse_po import FusePOTrainer  # noqa: F401
from .trainers.fuse_sft import FuseSFTTrainer  # noqa: F401
from .trainers.h3fusion_trainer import H3FusionTrainer  # noqa: F401
