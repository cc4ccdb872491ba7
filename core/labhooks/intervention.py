"""The :class:`Intervention` base class and the two built into the core.

An intervention is an ``nn.Module`` bound to a site and a position selector. Its
``forward`` receives the hidden state of the selected positions only, with shape
(..., width), where width is the hidden size (or, at a head site, (..., heads, head_dim)),
and returns the edited tensor of the same shape. The core gathers and scatters the
selected positions, so an intervention never receives or edits a pad position, and at a head
site it can only change the heads it is bound to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from labhooks.errors import BundleError, SiteError
from labhooks.positions import ForwardContext, Positions
from labhooks.sites import Site, SiteSpec, parse_site


@dataclass
class InterventionContext:
    """The information an intervention receives besides the hidden state.

    ``forward`` is None when the site has no token axis matching the model input (pooled
    embeddings, vision patches). ``row_index`` gives the batch row of each selected token
    when the core passed a gathered (tokens, width) tensor, and is None when it passed the
    whole hidden state.
    """

    site: Site
    forward: ForwardContext | None
    row_index: torch.Tensor | None = None
    selection: torch.Tensor | None = None


class Intervention(nn.Module):
    """Base class of every intervention.

    Subclasses set ``name`` (the registry name used in bundles), implement ``forward`` and
    ``config`` (the JSON-serialisable constructor arguments other than site and
    positions), and list in ``width_parameters`` which dimension of which parameter must
    equal the site width, so that attaching and loading can check it.
    """

    name: ClassVar[str] = ""
    width_parameters: ClassVar[Mapping[str, int]] = {}

    def __init__(self, site: str | SiteSpec | Site, positions: str | Positions | None = "all") -> None:
        super().__init__()
        self.site = parse_site(site)
        self.positions = Positions.parse(positions)

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor | None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Return the constructor arguments, other than site and positions, as JSON values."""
        return {}

    @classmethod
    def from_config(cls, site: str, positions: str, config: Mapping[str, Any]) -> Intervention:
        """Rebuild an intervention from a bundle manifest entry; tensors are loaded after."""
        return cls(site=site, positions=positions, **config)

    def check_width(self, width: int | None, site: Site | SiteSpec) -> None:
        """Raise :class:`SiteError` when a parameter does not fit the site width."""
        if width is None:
            return
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        for parameter_name, dim in self.width_parameters.items():
            tensor = tensors.get(parameter_name)
            if tensor is None or tensor.dim() == 0:
                continue
            if tensor.shape[dim] != width:
                raise SiteError(
                    f"intervention {self.name or type(self).__name__!r} at site {site}: parameter "
                    f"{parameter_name!r} has shape {tuple(tensor.shape)}, but the site width is {width} "
                    f"(dimension {dim} must be {width}). Was it made for another model?"
                )

    def extra_repr(self) -> str:
        return f"site={self.site}, positions={self.positions}"


class SteeringVector(Intervention):
    """Add ``scale * vector`` to the hidden state at every selected position."""

    name = "steering_vector"
    width_parameters = {"vector": -1}

    def __init__(
        self,
        site: str | SiteSpec | Site,
        vector: torch.Tensor | int,
        scale: float = 1.0,
        positions: str | Positions | None = "all",
        trainable: bool = False,
    ) -> None:
        super().__init__(site, positions)
        if isinstance(vector, int):
            vector = torch.zeros(vector)
        if not isinstance(vector, torch.Tensor) or vector.dim() not in (1, 2):
            raise ValueError(
                "vector must be a 1-D tensor of the site width (or 2-D, heads x head_dim, at a head "
                f"site), or an int width for a zero vector; got {vector!r}"
            )
        self.vector = nn.Parameter(vector.detach().clone().float(), requires_grad=trainable)
        self.scale = float(scale)

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        # A float32 vector on a half-precision model promotes the sum to float32, and the
        # core casts each intervention's output back to the hidden state's dtype.
        return torch.add(hidden, self.vector, alpha=self.scale)

    def config(self) -> dict[str, Any]:
        return {"vector": int(self.vector.shape[-1]), "scale": self.scale, "trainable": self.vector.requires_grad}

    @classmethod
    def from_config(cls, site: str, positions: str, config: Mapping[str, Any]) -> Intervention:
        options = dict(config)
        width = options.pop("vector")
        return cls(site=site, vector=int(width), positions=positions, **options)


EditFunction = Callable[[torch.Tensor, InterventionContext], "torch.Tensor | None"]


class FunctionIntervention(Intervention):
    """Run a plain Python callable ``fn(hidden, context)`` at a site.

    The callable returns the edited tensor, or None to leave the hidden state unchanged
    (for reading activations). It has no parameters to save, so it cannot go in a bundle.
    """

    name = "function"

    def __init__(self, site: str | SiteSpec | Site, fn: EditFunction, positions: str | Positions | None = "all") -> None:
        super().__init__(site, positions)
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(hidden, context), got {fn!r}")
        self.fn = fn

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor | None:
        return self.fn(hidden, context)

    def config(self) -> dict[str, Any]:
        raise BundleError(
            f"a FunctionIntervention at site {self.site} wraps a Python callable and cannot be saved "
            "in a bundle; write an Intervention subclass with parameters instead"
        )
