"""The ``roboshot`` plugin's hook implementations.

It also registers the site layout of :class:`labhooks.zeroshot.ZeroShotClassifier`, which
the ``otter`` plugin's interventions use as well.
"""

from __future__ import annotations

from typing import Any

from labhooks.hookspecs import hookimpl
from labhooks.zeroshot import ZEROSHOT_ADAPTER
from labhooks_roboshot.method import ROBOSHOT_METHOD
from labhooks_roboshot.projection import RoboShotProjection


@hookimpl
def labhooks_methods() -> list[Any]:
    return [ROBOSHOT_METHOD]


@hookimpl
def labhooks_interventions() -> list[Any]:
    return [RoboShotProjection]


@hookimpl
def labhooks_architectures() -> list[Any]:
    return [ZEROSHOT_ADAPTER]
