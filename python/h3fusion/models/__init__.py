"""h3fusion.models."""
