"""h3fusion.losses."""

from .gating import (  # noqa: F401
    canonical_param_name,
    drift_regularization,
    expert_drift_norms,
    expert_reference_state,
    gating_loss,
    load_balancing_loss,
    mean_router_probs,
)
from .lm import causal_lm_loss, lm_loss_from_hidden  # noqa: F401
from .preference import (  # noqa: F401
    PreferenceLossOutput,
    RLOOLossOutput,
    WRPOLossOutput,
    rloo_advantages,
    rloo_loss,
    simpo_loss,
    weighted_dpo_loss,
    weighted_sft_loss,
    wrpo_alpha,
    wrpo_loss,
)
