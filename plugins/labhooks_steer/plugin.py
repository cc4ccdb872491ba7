"""The steer plugin's hook implementations: intervention classes, trainable methods and oracle steering."""

from __future__ import annotations

from typing import Any

import labhooks
from labhooks.methods import Method
from labhooks_steer.interventions import INTERVENTION_CLASSES
from labhooks_steer.oracle import OracleConfig, run_oracle
from labhooks_steer.trainers import TRAINERS


@labhooks.hookimpl
def labhooks_interventions() -> list[Any]:
    return list(INTERVENTION_CLASSES)


@labhooks.hookimpl
def labhooks_trainers() -> list[Any]:
    return list(TRAINERS)


@labhooks.hookimpl
def labhooks_methods() -> list[Any]:
    return [
        Method(
            name="oracle",
            config_class=OracleConfig,
            run=run_oracle,
            summary="replay and least-squares linear steering of the differences between a base and a fine-tuned model, scored by KL per site",
        )
    ]
