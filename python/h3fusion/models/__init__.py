"""h3fusion.models."""

from .fuse import fuse_models, save_fused_model  # noqa: F401
