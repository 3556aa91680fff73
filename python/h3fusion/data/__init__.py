"""h3fusion.data."""
