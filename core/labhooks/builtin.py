"""The core's own plugin: the interventions built into labhooks."""

from __future__ import annotations

from typing import Any

from labhooks.hookspecs import hookimpl
from labhooks.intervention import SteeringVector


@hookimpl
def labhooks_interventions() -> list[Any]:
    return [SteeringVector]
