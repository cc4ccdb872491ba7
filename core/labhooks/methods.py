"""The method contract: a named recipe that turns a model (and data) into interventions.

A plugin contributes :class:`Method` objects. ``run`` receives a :class:`MethodInputs`
(the loaded model, or None for methods that need none, the config and a progress
reporter) and returns a :class:`MethodResult`, which the caller saves as a bundle and
shows as tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from labhooks.intervention import Intervention
from labhooks.models import LoadedModel
from labhooks.progress import LoggingProgress, Progress


@dataclass
class ReportTable:
    """A result table: the CLI renders it with rich, Python callers read the rows."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class MethodInputs:
    """The inputs of a method's ``run``."""

    config: Any
    loaded: LoadedModel | None = None
    progress: Progress = field(default_factory=LoggingProgress)


@dataclass
class MethodResult:
    """The output of a method's ``run``: interventions and tensors for the bundle, and a report."""

    interventions: list[Intervention] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: list[ReportTable] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A named recipe of a plugin.

    ``model_kind`` selects the model the CLI loads: "causal_lm", "encoder" or "none".
    """

    name: str
    config_class: type
    run: Callable[[MethodInputs], MethodResult]
    summary: str
    model_kind: str = "causal_lm"
