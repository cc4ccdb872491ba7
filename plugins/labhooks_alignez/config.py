"""The AlignEZ config and its preference axes.

An axis is a pair of keywords (the preferred and the dispreferred kind of answer) and a
mode. Three axes are built in, and ``PREFERRED/DISPREFERRED`` names a new one. A mode suffix
(``helpful:suppress``, ``concise/rambling:boost``) overrides the axis's default mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import labhooks
from labhooks.errors import ConfigError
from labhooks.positions import Positions
from labhooks.sites import parse_site

MODES = ("boost", "suppress")
EDITABLE_SITE_KINDS = ("post_mlp", "post_block", "pre_mlp")


@dataclass(frozen=True)
class Axis:
    """One preference axis: the keyword pair that prompts the model, and the edit mode.

    A ``boost`` axis edits a token along the directions on which it already leans toward
    the preferred side, and strengthens that lean. A ``suppress`` axis edits it along the
    directions on which it leans toward the dispreferred side, and weakens that lean.
    """

    name: str
    preferred: str
    dispreferred: str
    mode: str = "boost"


BUILTIN_AXES = {
    "helpful": Axis("helpful", "helpful", "useless", "boost"),
    "harmless": Axis("harmless", "safety-first", "malicious", "suppress"),
    "humorous": Axis("humorous", "humorous", "dull and boring", "boost"),
}


def parse_axis(text: str) -> Axis:
    """Parse ``helpful``, ``harmless:boost`` or ``concise/rambling[:MODE]`` into an :class:`Axis`."""
    stripped = text.strip()
    body, separator, mode = stripped.rpartition(":")
    if not separator:
        body, mode = stripped, ""
    body, mode = body.strip(), mode.strip()
    if separator and mode not in MODES:
        raise ConfigError(f"invalid axis {text!r}: the mode after ':' must be boost or suppress")

    if "/" in body:
        preferred, _, dispreferred = body.partition("/")
        preferred, dispreferred = preferred.strip(), dispreferred.strip()
        if not preferred or not dispreferred or "/" in dispreferred:
            raise ConfigError(f"invalid axis {text!r}: write a new axis as PREFERRED/DISPREFERRED, e.g. concise/rambling")
        return Axis(f"{preferred}/{dispreferred}", preferred, dispreferred, mode or "boost")

    builtin = BUILTIN_AXES.get(body)
    if builtin is None:
        raise ConfigError(
            f"unknown axis {body!r}: use one of {', '.join(BUILTIN_AXES)}, or PREFERRED/DISPREFERRED for a new axis (e.g. concise/rambling)"
        )
    return Axis(builtin.name, builtin.preferred, builtin.dispreferred, mode or builtin.mode)


@dataclass
class AlignEZConfig:
    """Options of ``labhooks apply plugin=alignez``."""

    axes: list[str] = labhooks.option(
        ["helpful"],
        "preference axes: helpful, harmless, humorous, or PREFERRED/DISPREFERRED for a new one; append :boost or :suppress to set the mode",
    )
    weights: list[float] = labhooks.option([], "weight of each axis, in the order of axes; empty gives every axis weight 1")
    queries: str = labhooks.option(
        "", "query file (.jsonl with a 'query' field, .json list, or one query a line); empty uses the shipped set"
    )
    num_queries: int = labhooks.option(12, "queries drawn (seeded) from the query file; 0 uses all of them", "queries")
    held_out: float = labhooks.option(
        0.25, "fraction of the drawn queries kept out of fitting and used for the preference margin", "fraction"
    )
    characteristics_tokens: int = labhooks.option(48, "max new tokens when the model describes a good and a bad answer", "tokens")
    response_tokens: int = labhooks.option(96, "max new tokens of each self-generated response", "tokens")
    batch_size: int = labhooks.option(16, "rows per generation and forward batch", "rows")
    seed: int = labhooks.option(0, "seed of the query draw and of the sampled self-generated data")
    site: str = labhooks.option(
        "post_mlp[*]", "site read and edited: post_mlp[*] (MLP output), post_block[*] (residual stream) or a layer subset"
    )
    threshold: float = labhooks.option(
        0.8, "a pair is dropped at a layer when its two representations have a cosine similarity above this", "cosine"
    )
    explained_variance: float = labhooks.option(
        0.9, "per layer and axis, keep singular vectors up to this cumulative explained variance", "fraction"
    )
    max_directions: int = labhooks.option(8, "cap on the directions kept per layer and axis", "directions")
    alpha: float = labhooks.option(1.0, "edit strength: each kept direction moves a token by at most alpha times the axis weight")
    top_layers: int = labhooks.option(
        5, "edit only the layers with the largest projected edit on the fitting queries; 0 edits every fitted layer", "layers"
    )
    edit_form: Literal["simultaneous", "sequential"] = labhooks.option(
        "simultaneous", "simultaneous: every inner product on the unedited state; sequential: one direction after another"
    )
    positions: str = labhooks.option("last_prompt+generated", "positions edited at inference (a labhooks position selector)")
    compare_prompts: int = labhooks.option(4, "held-out queries shown base and steered side by side", "prompts")
    compare_tokens: int = labhooks.option(48, "max new tokens of the side-by-side greedy generations", "tokens")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid value."""
        parsed = self.parsed_axes()
        names = [axis.name for axis in parsed]
        if len(set(names)) != len(names):
            raise ConfigError(f"invalid axes {','.join(self.axes)}: an axis is listed twice")
        if self.weights and len(self.weights) != len(parsed):
            raise ConfigError(f"invalid weights {self.weights}: give one weight per axis ({len(parsed)} axes: {', '.join(names)})")
        if any(not math.isfinite(weight) for weight in self.weights):
            raise ConfigError(f"invalid weights {self.weights}: every weight must be a finite number")

        for name in ("characteristics_tokens", "response_tokens", "batch_size", "max_directions", "compare_tokens"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"invalid value {value} for {name}: must be >= 1")
        for name in ("num_queries", "top_layers", "compare_prompts"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"invalid value {value} for {name}: must be >= 0")
        if self.num_queries and self.num_queries < 3:
            raise ConfigError(f"invalid value {self.num_queries} for num_queries: need at least 3 (2 to fit, 1 held out), or 0 for all")
        if not 0.0 < self.held_out < 1.0:
            raise ConfigError(f"invalid value {self.held_out} for held_out: must be between 0 and 1 (exclusive)")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"invalid value {self.threshold} for threshold: a cosine similarity lies in [-1, 1]")
        if not 0.0 < self.explained_variance <= 1.0:
            raise ConfigError(f"invalid value {self.explained_variance} for explained_variance: must be in (0, 1]")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"invalid value {self.alpha} for alpha: must be a finite number")

        spec = parse_site(self.site)
        if spec.kind not in EDITABLE_SITE_KINDS or spec.heads is not None:
            raise ConfigError(
                f"invalid site {self.site!r}: AlignEZ reads per-layer hidden states, use post_mlp[*], post_block[*] or pre_mlp[*]"
            )
        Positions.parse(self.positions)

    def parsed_axes(self) -> list[Axis]:
        if not self.axes:
            raise ConfigError("axes is empty: give at least one axis, e.g. axes=helpful")
        return [parse_axis(text) for text in self.axes]

    def axis_weights(self) -> list[float]:
        return list(self.weights) if self.weights else [1.0] * len(self.axes)
