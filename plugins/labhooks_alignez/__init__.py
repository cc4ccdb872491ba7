"""labhooks plugin alignez (being built)."""

LABHOOKS_EXTRA = None
