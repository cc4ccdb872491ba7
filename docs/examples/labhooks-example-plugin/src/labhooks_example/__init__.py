"""An example third-party labhooks plugin: per-feature scaling at any site."""

LABHOOKS_EXTRA = None
