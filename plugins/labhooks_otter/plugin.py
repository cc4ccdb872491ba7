"""The ``otter`` plugin's hook implementations.

POT is imported here so that a missing ``POT`` package marks the plugin unavailable, with
the extra to install, instead of failing when a method runs.
"""

from __future__ import annotations

from typing import Any

import ot  # noqa: F401

from labhooks.hookspecs import hookimpl
from labhooks_otter.interventions import OtterRebalance, RotterReweight
from labhooks_otter.method import MCQ_METHOD, REBALANCE_METHOD, ROTTER_METHOD


@hookimpl
def labhooks_methods() -> list[Any]:
    return [REBALANCE_METHOD, ROTTER_METHOD, MCQ_METHOD]


@hookimpl
def labhooks_interventions() -> list[Any]:
    return [OtterRebalance, RotterReweight]
