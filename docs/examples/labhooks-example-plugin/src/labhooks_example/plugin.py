"""The hook implementations labhooks discovers through the ``labhooks`` entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import labhooks


class FeatureScale(labhooks.Intervention):
    """Multiply each feature of the hidden state by ``1 + delta`` (``delta`` starts at zero)."""

    name = "example_feature_scale"
    width_parameters = {"delta": -1}

    def __init__(self, site: str, width: int, positions: str = "all") -> None:
        super().__init__(site, positions)
        self.delta = nn.Parameter(torch.zeros(width))

    def forward(self, hidden: torch.Tensor, context: labhooks.InterventionContext) -> torch.Tensor:
        return hidden * (1 + self.delta.to(hidden.dtype))

    def config(self) -> dict[str, Any]:
        return {"width": int(self.delta.shape[0])}


@dataclass
class DampenConfig:
    site: str = labhooks.option("post_block[-1]", "Site whose features are scaled.")
    factor: float = labhooks.option(0.5, "Scale applied to every feature; 1 leaves the model unchanged.")


def dampen(inputs: labhooks.MethodInputs) -> labhooks.MethodResult:
    """Scale every feature at one site by a constant factor."""
    config = inputs.config
    if inputs.loaded is None:
        raise labhooks.ConfigError("the dampen method needs a model")
    width = labhooks.sites(inputs.loaded.model).hidden_size()
    intervention = FeatureScale(config.site, width)
    with torch.no_grad():
        intervention.delta.fill_(config.factor - 1)
    return labhooks.MethodResult(interventions=[intervention], metrics={"factor": config.factor})


@labhooks.hookimpl
def labhooks_interventions() -> list[Any]:
    return [FeatureScale]


@labhooks.hookimpl
def labhooks_methods() -> list[Any]:
    return [labhooks.Method("dampen", DampenConfig, dampen, "Scale the features at one site by a constant.")]
