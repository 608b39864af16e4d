"""causalir."""
