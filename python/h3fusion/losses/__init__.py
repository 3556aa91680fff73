"""h3fusion.losses."""
