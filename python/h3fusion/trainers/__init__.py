"""h3fusion.trainers."""
from .h3fusion_trainer import (  # noqa: F401
    H3FusionTrainer,
    causal_lm_loss,
    is_trainable_h3fusion_param,
    prepare_h3fusion_model,
)
