"""h3fusion.trainers."""

from .fuse_po import FUSE_PO_LOSSES, FusePOTrainer  # noqa: F401
from .fuse_sft import FuseSFTTrainer  # noqa: F401
from .h3fusion_trainer import (  # noqa: F401
    H3FusionTrainer,
    causal_lm_loss,
    is_trainable_h3fusion_param,
    prepare_h3fusion_model,
)
from .reference_logps import model_fingerprint, precompute_reference_logps  # noqa: F401
from .sequence_logprobs import SequenceLogprobs, sequence_logprobs  # noqa: F401
