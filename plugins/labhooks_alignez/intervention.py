"""The AlignEZ edit: move each token along the preference directions it is kept on.

Every stored direction ``p`` is a unit vector that points toward the preferred side of its
axis. For a token state ``x`` and score ``s = <x, p>``:

* a ``boost`` axis keeps the directions with ``s >= 0`` (the token already leans
  preferred) and adds ``alpha * w * tanh(s) * p``;
* a ``suppress`` axis keeps the directions with ``s < 0`` (the token leans dispreferred)
  and adds ``-alpha * w * tanh(s) * p``;
* every other direction leaves ``x`` unchanged.

With positive ``alpha`` and ``w``, ``<x, p>`` grows on every kept direction either way,
and each direction moves ``x`` by at most ``|alpha * w|``. Written with ``theta = -p``, this
is the method's rule: a boost axis keeps the directions with ``cos(x, theta) <= 0`` and
adds ``alpha * tanh(<x, theta>) * theta``, a suppress axis keeps those with
``cos(x, theta) > 0`` and subtracts it. The method leaves the sign of theta to the SVD.
labhooks fixes it, so that the rule always favours the preferred side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from labhooks.intervention import Intervention, InterventionContext
from labhooks.positions import Positions
from labhooks.sites import Site, SiteSpec

MODE_SIGNS = {"boost": 1.0, "suppress": -1.0}
EDIT_FORMS = ("simultaneous", "sequential")
DEFAULT_POSITIONS = "last_prompt+generated"


def kept_directions(scores: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Return which directions each token is edited on: scores >= 0 for boost (+1), < 0 for suppress (-1)."""
    return torch.where(signs > 0, scores >= 0, scores < 0)


def edit_coefficients(scores: torch.Tensor, signs: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return the step along each direction: ``alpha * w * sign * tanh(score)`` where kept, else 0.

    The step is never negative when ``alpha`` and ``w`` are not.
    """
    steps = alpha * weights * signs * torch.tanh(scores)
    return torch.where(kept_directions(scores, signs), steps, torch.zeros_like(steps))


class AlignEZIntervention(Intervention):
    """The AlignEZ edit at one per-layer site, for one or several axes.

    ``directions`` has shape (directions, width): the directions of every axis, one axis
    after the other, with ``counts[i]`` rows for axis ``i``. An int gives an all-zero
    tensor of that width, which :func:`labhooks.load_bundle` then fills.
    """

    name = "alignez"
    width_parameters = {"directions": -1}

    def __init__(
        self,
        site: str | SiteSpec | Site,
        directions: torch.Tensor | int,
        counts: Sequence[int],
        modes: Sequence[str],
        weights: Sequence[float],
        alpha: float = 1.0,
        form: str = "simultaneous",
        axes: Sequence[str] | None = None,
        positions: str | Positions | None = DEFAULT_POSITIONS,
    ) -> None:
        super().__init__(site, positions)
        counts, modes, weights = [int(count) for count in counts], list(modes), [float(weight) for weight in weights]
        if not len(counts) == len(modes) == len(weights):
            raise ValueError(f"counts, modes and weights need one entry per axis, got {len(counts)}, {len(modes)} and {len(weights)}")
        unknown = [mode for mode in modes if mode not in MODE_SIGNS]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}: use boost or suppress")
        if form not in EDIT_FORMS:
            raise ValueError(f"unknown edit form {form!r}: use simultaneous or sequential")
        if isinstance(directions, int):
            directions = torch.zeros(sum(counts), directions)
        if not isinstance(directions, torch.Tensor) or directions.dim() != 2:
            raise ValueError(f"directions must be a 2-D tensor (directions, width) or an int width, got {directions!r}")
        if directions.shape[0] != sum(counts):
            raise ValueError(f"directions has {directions.shape[0]} rows but counts {counts} add up to {sum(counts)}")

        axes = list(axes) if axes is not None else [f"axis{index}" for index in range(len(counts))]
        if len(axes) != len(counts):
            raise ValueError(f"axes {axes} must name one axis per entry of counts ({len(counts)})")

        self.counts, self.modes, self.weights, self.axes = counts, modes, weights, axes
        self.alpha = float(alpha)
        self.form = form
        self.register_buffer("directions", directions.detach().clone().float())
        # Per-direction mode signs and axis weights follow from the config, so they are not saved.
        self.register_buffer(
            "direction_signs", torch.tensor([MODE_SIGNS[m] for m, c in zip(modes, counts, strict=True) for _ in range(c)]), persistent=False
        )
        self.register_buffer(
            "direction_weights", torch.tensor([w for w, c in zip(weights, counts, strict=True) for _ in range(c)]), persistent=False
        )

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        directions = self.directions.to(hidden.device)
        if directions.shape[0] == 0:
            return hidden
        signs = self.direction_signs.to(hidden.device)
        weights = self.direction_weights.to(hidden.device)
        state = hidden.float()

        if self.form == "simultaneous":
            steps = edit_coefficients(state @ directions.T, signs, weights, self.alpha)
            edited = state + steps @ directions
        else:
            edited = state
            for index in range(directions.shape[0]):
                direction = directions[index]
                step = edit_coefficients(edited @ direction, signs[index], weights[index], self.alpha)
                edited = edited + step.unsqueeze(-1) * direction
        return edited.to(hidden.dtype)

    def config(self) -> dict[str, Any]:
        return {
            "directions": int(self.directions.shape[-1]),
            "counts": self.counts,
            "modes": self.modes,
            "weights": self.weights,
            "alpha": self.alpha,
            "form": self.form,
            "axes": self.axes,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axes={self.axes}, counts={self.counts}, alpha={self.alpha}, form={self.form}"
