"""h3fusion.trainers."""
