"""OTTER and R-OTTER as interventions at a ``logits`` site.

Both can act on every output column (a zero-shot classifier's class logits) or on a subset
given by ``class_indices`` (for example the vocabulary ids of the option letters A to D at a
language model's ``logits`` site). Columns outside the subset are left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from labhooks.errors import ConfigError, SiteError
from labhooks.intervention import Intervention, InterventionContext
from labhooks.positions import Positions
from labhooks.sites import Site, SiteSpec
from labhooks_otter.transport import SCORE_KINDS, SOLVERS, transport_plan

# The log of a zero entry of an exact plan, so that edited logits stay finite.
_LOG_FLOOR = float(np.log(1e-30))


def _check_class_indices(class_indices: Sequence[int] | None, num_classes: int) -> list[int] | None:
    if class_indices is None:
        return None
    indices = [int(index) for index in class_indices]
    if len(indices) != num_classes:
        raise ConfigError(f"class_indices lists {len(indices)} columns, but the target has {num_classes} classes")
    if len(set(indices)) != len(indices) or min(indices) < 0:
        raise ConfigError(f"class_indices must be distinct non-negative column indices, got {indices}")
    return indices


class _ClassColumns(Intervention):
    """Shared part: the class columns of a logits tensor and the width check."""

    class_indices: list[int] | None

    def _num_classes(self) -> int:
        raise NotImplementedError

    def check_width(self, width: int | None, site: Site | SiteSpec) -> None:
        if width is None:
            return
        if self.class_indices is None and width != self._num_classes():
            raise SiteError(
                f"{self.name} at site {site}: it has {self._num_classes()} classes, but the site has {width} columns; "
                "pass class_indices to pick the class columns of a wider logits tensor"
            )
        if self.class_indices is not None and max(self.class_indices) >= width:
            raise SiteError(f"{self.name} at site {site}: class index {max(self.class_indices)} is out of range for {width} columns")

    def _columns(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.class_indices is None:
            if hidden.shape[-1] != self._num_classes():
                raise SiteError(f"{self.name}: expected {self._num_classes()} class columns, got a tensor of shape {tuple(hidden.shape)}")
            return hidden
        return hidden[..., self.class_indices]

    def _write(self, hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        if self.class_indices is None:
            return columns.to(hidden.dtype)
        edited = hidden.clone()
        edited[..., self.class_indices] = columns.to(hidden.dtype)
        return edited


class OtterRebalance(_ClassColumns):
    """OTTER at a ``logits`` site: rebalance the predictions of a whole batch to a target distribution.

    The hidden state must be (batch, width): each forward solves one transport problem over
    its rows, so the batch is the set of inputs whose predictions are matched to
    ``target``. The class columns of row i become ``max_j s_ij + log(n * plan_ij)``: the
    argmax follows the plan, the best score keeps its value, and a softmax over the class
    columns gives the row of the plan. A batch of one input is assigned to the target's
    most likely class; use :class:`RotterReweight` for one input at a time.
    """

    name = "otter_rebalance"

    def __init__(
        self,
        site: str | SiteSpec | Site = "logits",
        target: torch.Tensor | Sequence[float] | int = 2,
        *,
        solver: str = "emd",
        reg: float = 0.05,
        max_iterations: int = 1000,
        scores: str = "logits",
        class_indices: Sequence[int] | None = None,
        positions: str | Positions | None = "all",
    ) -> None:
        super().__init__(site, positions)
        if solver not in SOLVERS:
            raise ConfigError(f"invalid solver {solver!r}: choose one of {', '.join(SOLVERS)}")
        if scores not in SCORE_KINDS:
            raise ConfigError(f"invalid scores {scores!r}: choose one of {', '.join(SCORE_KINDS)}")
        values = torch.full((int(target),), 1.0 / int(target)) if isinstance(target, int) else torch.as_tensor(target, dtype=torch.float32)
        if values.dim() != 1 or values.numel() < 2 or (values < 0).any() or float(values.sum()) <= 0:
            raise ConfigError(f"target must be a distribution over at least two classes, got {values.tolist()}")
        self.register_buffer("target", (values / values.sum()).float())
        self.solver = solver
        self.reg = float(reg)
        self.max_iterations = int(max_iterations)
        self.scores = scores
        self.class_indices = _check_class_indices(class_indices, values.numel())
        self.last_plan: np.ndarray | None = None

    def _num_classes(self) -> int:
        return int(self.target.numel())

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        if hidden.dim() == 3 and hidden.shape[1] == 1:
            # A language model computing logits for the last position only (logits_to_keep=1,
            # as generate() does at prefill): one row per input.
            return self.forward(hidden[:, 0], context).unsqueeze(1)
        one_per_row = context.row_index is None or context.row_index.unique().numel() == context.row_index.numel()
        if hidden.dim() != 2 or not one_per_row:
            raise SiteError(
                f"otter_rebalance at site {context.site} got a tensor of shape {tuple(hidden.shape)}; it rebalances a batch "
                "of (inputs, classes) rows. At a language model's logits site, select one position per row, e.g. "
                "positions='last_prompt'"
            )
        columns = self._columns(hidden)
        plan = transport_plan(
            columns.detach().float().cpu(),
            self.target.cpu(),
            kind=self.scores,
            solver=self.solver,
            reg=self.reg,
            max_iterations=self.max_iterations,
        )
        self.last_plan = plan
        rows = torch.from_numpy(plan * plan.shape[0]).to(device=hidden.device, dtype=torch.float32)
        posterior = rows.clamp_min(1e-30).log().clamp_min(_LOG_FLOOR)
        best = columns.float().max(dim=-1, keepdim=True).values
        return self._write(hidden, best + posterior)

    def config(self) -> dict[str, Any]:
        return {
            "target": int(self.target.numel()),
            "solver": self.solver,
            "reg": self.reg,
            "max_iterations": self.max_iterations,
            "scores": self.scores,
            "class_indices": self.class_indices,
        }

    def extra_repr(self) -> str:
        return f"site={self.site}, classes={self.target.numel()}, solver={self.solver}, positions={self.positions}"


class RotterReweight(_ClassColumns):
    """R-OTTER at a ``logits`` site: add fitted per-class log-weights, one input at a time.

    The log-weights are fitted so that ``argmax(log p + log_weights)`` reproduces OTTER's
    predictions on a validation batch (:func:`labhooks_otter.transport.fit_rotter`). Adding
    them to logits reweights the probabilities by ``exp(log_weights)``. Any hidden shape with
    the classes last works, so it also applies at every position of a language model.
    """

    name = "rotter_reweight"

    def __init__(
        self,
        site: str | SiteSpec | Site = "logits",
        log_weights: torch.Tensor | int = 2,
        *,
        class_indices: Sequence[int] | None = None,
        positions: str | Positions | None = "all",
    ) -> None:
        super().__init__(site, positions)
        values = torch.zeros(int(log_weights)) if isinstance(log_weights, int) else torch.as_tensor(log_weights, dtype=torch.float32)
        if values.dim() != 1 or values.numel() < 2 or not torch.isfinite(values).all():
            raise ConfigError(f"log_weights must be a finite 1-D tensor over at least two classes, got shape {tuple(values.shape)}")
        self.log_weights = nn.Parameter(values.detach().clone().float(), requires_grad=False)
        self.class_indices = _check_class_indices(class_indices, values.numel())

    def _num_classes(self) -> int:
        return int(self.log_weights.numel())

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        columns = self._columns(hidden)
        return self._write(hidden, columns.float() + self.log_weights.to(hidden.device))

    def config(self) -> dict[str, Any]:
        return {"log_weights": int(self.log_weights.numel()), "class_indices": self.class_indices}

    def extra_repr(self) -> str:
        return f"site={self.site}, classes={self.log_weights.numel()}, positions={self.positions}"
