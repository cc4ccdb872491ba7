"""labhooks plugin ws (being built)."""

LABHOOKS_EXTRA = "ws"
