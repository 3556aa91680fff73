"""Plain-PyTorch versions of every h3fusion_ext op, written the obvious way: the test oracle and a fallback.

They take and return the same shapes and dtypes as the extension ops and are differentiable through
ordinary autograd.
"""

from .logprob import linear_logprob
from .moe import ACTIVATIONS, gated_activation, moe_combine, moe_ffn, moe_gather, moe_lora_ffn, moe_route_plan
from .routing import topk_route

__all__ = [
    "ACTIVATIONS",
    "gated_activation",
    "linear_logprob",
    "moe_combine",
    "moe_ffn",
    "moe_gather",
    "moe_lora_ffn",
    "moe_route_plan",
    "topk_route",
]
