"""labhooks plugin steer (being built)."""

LABHOOKS_EXTRA = "steer"
