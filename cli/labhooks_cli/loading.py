"""Model loading for CLI commands, with a status spinner."""

from __future__ import annotations

import labhooks
from labhooks.models import DEFAULT_ENCODER_NAME, DEFAULT_MODEL_NAME, LoadedModel
from labhooks_cli.console import error_console


def load_model_for_cli(spec: str | None, kind: str = "causal_lm") -> LoadedModel:
    """Load ``model=`` (or the embedded default) behind a status line that names it."""
    if kind == "none":
        raise ValueError("this command needs no model")
    shown = spec or (DEFAULT_ENCODER_NAME if kind == "encoder" else DEFAULT_MODEL_NAME) + " (embedded default)"
    with error_console.status(f"loading {shown}"):
        return labhooks.load_model(spec, kind=kind)
