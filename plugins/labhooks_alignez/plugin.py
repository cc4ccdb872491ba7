"""The alignez plugin: the ``alignez`` method and the intervention class its bundles hold."""

from __future__ import annotations

from typing import Any

import labhooks
from labhooks_alignez.config import AlignEZConfig
from labhooks_alignez.intervention import AlignEZIntervention
from labhooks_alignez.method import run

ALIGNEZ = labhooks.Method(
    name="alignez",
    config_class=AlignEZConfig,
    run=run,
    summary="Steer a language model toward a preference with pairs it writes itself, no fine-tuning (AlignEZ).",
    model_kind="causal_lm",
)


@labhooks.hookimpl
def labhooks_methods() -> list[Any]:
    return [ALIGNEZ]


@labhooks.hookimpl
def labhooks_interventions() -> list[Any]:
    return [AlignEZIntervention]
