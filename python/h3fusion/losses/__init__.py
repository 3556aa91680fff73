"""h3fusion.losses."""

from .preference import (  # noqa: F401
    rloo_advantages,
    rloo_loss,
    simpo_loss,
    weighted_dpo_loss,
    weighted_sft_loss,
    wrpo_alpha,
    wrpo_loss,
)
