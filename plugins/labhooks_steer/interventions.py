"""The trainable steering interventions.

Every class starts as a no-op (its output equals its input until it is trained), saves
its constructor arguments through ``config()`` and so round-trips through a bundle.
Residual-stream classes receive (..., width); the head-level ones (LoFIT, JoLA) attach
at ``pre_mlp[l].heads[...]`` and receive (..., heads, head_dim), one row per selected head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from labhooks.intervention import Intervention, InterventionContext
from labhooks.positions import Positions
from labhooks.sites import Site, SiteSpec

SiteArgument = str | SiteSpec | Site
PositionsArgument = str | Positions | None

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda tensor: tensor,
    "silu": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "tanh": torch.tanh,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


class LowRankAdapter(Intervention):
    """Post-block low-rank adapter: h + W_up·φ(W_down·h), with no bias.

    ``W_up`` starts at zero, so the adapter starts as a no-op; ``W_down`` starts small
    (Kaiming uniform scaled by ``init_scale``). With ``activation="none"`` it is the linear
    variant, with ``rank=1`` the rank-1 adapter.
    """

    name = "steer.low_rank_adapter"
    width_parameters = {"down": -1, "up": 0}

    def __init__(
        self,
        site: SiteArgument,
        width: int,
        rank: int = 8,
        activation: str = "silu",
        init_scale: float = 1e-3,
        positions: PositionsArgument = "all",
    ) -> None:
        super().__init__(site, positions)
        self.width = _positive("width", width)
        self.rank = _positive("rank", rank)
        self.activation = activation
        self.init_scale = float(init_scale)
        self._function = _activation(activation)
        self.down = nn.Parameter(torch.empty(rank, width))
        self.up = nn.Parameter(torch.zeros(width, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        with torch.no_grad():
            self.down.mul_(self.init_scale)

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        down = self.down.to(hidden.dtype)
        up = self.up.to(hidden.dtype)
        return hidden + nn.functional.linear(self._function(nn.functional.linear(hidden, down)), up)

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "rank": self.rank, "activation": self.activation, "init_scale": self.init_scale}


class OrthonormalRows(nn.Module):
    """Parametrization mapping a (rank, width) matrix to one with orthonormal rows.

    The rows are the Q factor of a reduced QR decomposition of the transpose, with signs
    chosen so that R's diagonal is positive, which makes the map continuous. Unlike
    ``torch.nn.utils.parametrizations.orthogonal`` with the Householder map, every input
    matrix gives orthonormal rows, and unlike its matrix-exponential map the cost grows
    with width x rank instead of width².
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(weight.transpose(-2, -1))
        signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) >= 0, 1.0, -1.0).to(q.dtype)
        return (q * signs.unsqueeze(-2)).transpose(-2, -1)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class ReFT(Intervention):
    """Low-rank representation fine-tuning: h + Rᵀ(φ(W·h + b) − φ(R·h)).

    With ``activation="none"`` this is LoReFT, h + Rᵀ(W·h + b − R·h). In the ``loreft``
    variant R has orthonormal rows, kept so during training by the
    :class:`OrthonormalRows` parametrization; ``noreft`` drops that constraint. W starts equal to
    R and b at zero, so the edit starts as a no-op for every activation.
    """

    name = "steer.reft"
    width_parameters = {"rotation.parametrizations.weight.original": -1, "rotation.weight": -1, "source.weight": -1}

    def __init__(
        self,
        site: SiteArgument,
        width: int,
        rank: int = 8,
        variant: str = "loreft",
        activation: str = "none",
        positions: PositionsArgument = "last_prompt:5",
    ) -> None:
        super().__init__(site, positions)
        if variant not in ("loreft", "noreft"):
            raise ValueError(f"unknown ReFT variant {variant!r}; choose loreft or noreft")
        self.width = _positive("width", width)
        self.rank = _positive("rank", rank)
        if rank > width:
            raise ValueError(f"ReFT rank {rank} exceeds the site width {width}")
        self.variant = variant
        self.activation = activation
        self._function = _activation(activation)
        self.rotation = nn.Linear(width, rank, bias=False)
        if variant == "loreft":
            parametrize.register_parametrization(self.rotation, "weight", OrthonormalRows())
        self.source = nn.Linear(width, rank, bias=True)
        with torch.no_grad():
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        rotation = self.rotation.weight.to(hidden.dtype)
        learned = self._function(nn.functional.linear(hidden, self.source.weight.to(hidden.dtype), self.source.bias.to(hidden.dtype)))
        projected = self._function(nn.functional.linear(hidden, rotation))
        return hidden + (learned - projected) @ rotation

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "rank": self.rank, "variant": self.variant, "activation": self.activation}


def _head_shape(heads: int, head_dim: int) -> tuple[int, int]:
    return _positive("heads", heads), _positive("head_dim", head_dim)


class LoFIT(Intervention):
    """LoFIT per-head edit before the attention output projection: z ← (1 + A)⊙z + v.

    A (``scale``) and v (``bias``) have shape (heads, head_dim) for the heads of the site
    and start at zero. ``train_scale`` and ``train_bias`` choose which of them train: the
    head-selection stage trains A, the final stage trains v on the selected heads.
    """

    name = "steer.lofit"
    width_parameters = {"scale": -1, "bias": -1}

    def __init__(
        self,
        site: SiteArgument,
        heads: int,
        head_dim: int,
        train_scale: bool = True,
        train_bias: bool = True,
        positions: PositionsArgument = "all",
    ) -> None:
        super().__init__(site, positions)
        self.heads, self.head_dim = _head_shape(heads, head_dim)
        self.scale = nn.Parameter(torch.zeros(heads, head_dim), requires_grad=train_scale)
        self.bias = nn.Parameter(torch.zeros(heads, head_dim), requires_grad=train_bias)

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        return hidden * (1 + self.scale.to(hidden.dtype)) + self.bias.to(hidden.dtype)

    def head_norms(self) -> torch.Tensor:
        """Return ||A|| per head, the LoFIT head-selection score."""
        return self.scale.detach().norm(dim=-1)

    def config(self) -> dict[str, Any]:
        return {
            "heads": self.heads,
            "head_dim": self.head_dim,
            "train_scale": self.scale.requires_grad,
            "train_bias": self.bias.requires_grad,
        }


# Hard-Concrete gates (Louizos et al., 2018): a stretched, clamped binary-concrete sample.
GATE_TEMPERATURE = 0.33
GATE_STRETCH = (-0.1, 1.1)


class JoLA(Intervention):
    """JoLA per-head edit with Hard-Concrete gates: z ← (1 + g2·A)⊙z + g1·v.

    Each head has two gates, g1 for the offset v and g2 for the scale A, with learned
    log-alphas. In training mode with gradients enabled, a gate is a Hard-Concrete sample
    (temperature 0.33, stretch (−0.1, 1.1)). In eval mode, or under ``torch.no_grad()`` as
    in generation, it is deterministic: clamp(sigmoid(log_alpha)·(1.1 + 0.1) − 0.1, 0, 1),
    which is exactly 0 or 1 at the clamp edges. ``expected_l0`` is the expected number of open gates, the sparsity penalty.
    """

    name = "steer.jola"
    width_parameters = {"scale": -1, "bias": -1}

    def __init__(
        self,
        site: SiteArgument,
        heads: int,
        head_dim: int,
        initial_log_alpha: float = 1.0,
        temperature: float = GATE_TEMPERATURE,
        positions: PositionsArgument = "all",
    ) -> None:
        super().__init__(site, positions)
        self.heads, self.head_dim = _head_shape(heads, head_dim)
        if temperature <= 0:
            raise ValueError(f"gate temperature must be > 0, got {temperature}")
        self.initial_log_alpha = float(initial_log_alpha)
        self.temperature = float(temperature)
        self.scale = nn.Parameter(torch.zeros(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))
        self.scale_log_alpha = nn.Parameter(torch.full((heads,), self.initial_log_alpha))
        self.bias_log_alpha = nn.Parameter(torch.full((heads,), self.initial_log_alpha))

    def gate(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Return one gate per head: a Hard-Concrete sample when training with gradients, else deterministic."""
        low, high = GATE_STRETCH
        if self.training and torch.is_grad_enabled():
            noise = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            concrete = torch.sigmoid((noise.log() - (1 - noise).log() + log_alpha) / self.temperature)
        else:
            concrete = torch.sigmoid(log_alpha)
        return (concrete * (high - low) + low).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Return the expected number of non-zero gates, differentiable in the log-alphas."""
        low, high = GATE_STRETCH
        shift = self.temperature * math.log(-low / high)
        return torch.sigmoid(self.scale_log_alpha - shift).sum() + torch.sigmoid(self.bias_log_alpha - shift).sum()

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        scale_gate = self.gate(self.scale_log_alpha).unsqueeze(-1)
        bias_gate = self.gate(self.bias_log_alpha).unsqueeze(-1)
        scale = (scale_gate * self.scale).to(hidden.dtype)
        bias = (bias_gate * self.bias).to(hidden.dtype)
        return hidden * (1 + scale) + bias

    def config(self) -> dict[str, Any]:
        return {
            "heads": self.heads,
            "head_dim": self.head_dim,
            "initial_log_alpha": self.initial_log_alpha,
            "temperature": self.temperature,
        }


class LinearMap(Intervention):
    """Affine steering h + M·h + c, fitted by least squares from base to fine-tuned states.

    M (``weight``, width x width) and c (``bias``) start at zero, a no-op.
    """

    name = "steer.linear_map"
    width_parameters = {"weight": -1, "bias": -1}

    def __init__(self, site: SiteArgument, width: int, positions: PositionsArgument = "all") -> None:
        super().__init__(site, positions)
        self.width = _positive("width", width)
        self.weight = nn.Parameter(torch.zeros(width, width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        return hidden + nn.functional.linear(hidden, self.weight.to(hidden.dtype), self.bias.to(hidden.dtype))

    def config(self) -> dict[str, Any]:
        return {"width": self.width}


class OracleReplay(Intervention):
    """Replay of recorded differences Δh = h_fine-tuned − h_base for one batch of inputs.

    ``delta`` has shape (rows, tokens, width) and is indexed by batch row and absolute
    token position, so it applies to the same inputs under any padding. Tokens past the
    recorded length (generated ones) are left unchanged. It measures how far exact
    activation steering at a site can reproduce a fine-tuned model; it does not carry over
    to other inputs.
    """

    name = "steer.oracle_replay"
    width_parameters = {"delta": -1}

    def __init__(self, site: SiteArgument, rows: int, tokens: int, width: int, positions: PositionsArgument = "all") -> None:
        super().__init__(site, positions)
        self.rows = _positive("rows", rows)
        self.tokens = _positive("tokens", tokens)
        self.width = _positive("width", width)
        self.register_buffer("delta", torch.zeros(rows, tokens, width))

    @classmethod
    def from_deltas(cls, site: SiteArgument, delta: torch.Tensor, positions: PositionsArgument = "all") -> OracleReplay:
        """Build a replay from a (rows, tokens, width) tensor of differences."""
        if delta.dim() != 3:
            raise ValueError(f"delta must have shape (rows, tokens, width), got {tuple(delta.shape)}")
        replay = cls(site, int(delta.shape[0]), int(delta.shape[1]), int(delta.shape[2]), positions)
        replay.delta.copy_(delta.detach())
        return replay

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        forward = context.forward
        if forward is None:
            raise ValueError(f"oracle replay at {context.site} needs token positions, but this site has none")
        if forward.batch_size != self.rows:
            raise ValueError(f"oracle replay at {context.site} was recorded for {self.rows} rows, but the batch has {forward.batch_size}")
        tokens = hidden.shape[-2] if context.row_index is None else None
        if context.row_index is None:
            positions = forward.positions[:, -tokens:] if tokens else forward.positions
            rows = torch.arange(self.rows, device=hidden.device).unsqueeze(1).expand_as(positions)
        else:
            assert context.selection is not None
            positions = forward.positions[:, -context.selection.shape[1] :][context.selection]
            rows = context.row_index
        inside = (positions >= 0) & (positions < self.tokens)
        delta = self.delta.to(hidden.device, hidden.dtype)[rows, positions.clamp(0, self.tokens - 1)]
        return hidden + delta * inside.unsqueeze(-1).to(hidden.dtype)

    def config(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "width": self.width}


INTERVENTION_CLASSES: tuple[type[Intervention], ...] = (LowRankAdapter, ReFT, LoFIT, JoLA, LinearMap, OracleReplay)
