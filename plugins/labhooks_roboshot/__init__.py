"""labhooks plugin roboshot (being built)."""

LABHOOKS_EXTRA = "roboshot"
