"""topk_route op wrapper. INTERIM: delegates to the reference until the kernel lands (owner: moe-cpu helper)."""

from .reference.routing import topk_route

__all__ = ["topk_route"]
