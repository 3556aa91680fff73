"""MoE op wrappers. INTERIM: delegates to the reference until the kernels land (owner: moe-cpu helper)."""

from .reference.moe import moe_combine, moe_ffn, moe_gather, moe_route_plan

__all__ = ["moe_combine", "moe_ffn", "moe_gather", "moe_route_plan"]
