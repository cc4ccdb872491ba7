"""labhooks plugin otter (being built)."""

LABHOOKS_EXTRA = "otter"
