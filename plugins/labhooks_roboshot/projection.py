"""RoboShot's embedding edit: reject harmful insight directions, amplify helpful ones.

For each harmful direction v the embedding loses its component along v,
``x <- x - (<x, v> / <v, v>) v``; for each helpful direction u it gains it once more,
``x <- x + (<x, u> / <u, u>) u``. Harmful directions are applied first, in order, then the
helpful ones. Without orthonormalisation the steps do not commute when the directions are
not orthogonal, so a later rejection can bring back part of an earlier one.

Every step is linear, so renormalising x after each step changes only its norm: a
classifier that scores by cosine similarity (CLIP, :class:`labhooks.zeroshot.ZeroShotClassifier`)
predicts the same with or without it. It matters for heads that score by dot product.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from labhooks.errors import ConfigError, SiteError
from labhooks.intervention import Intervention, InterventionContext
from labhooks.positions import Positions
from labhooks.sites import Site, SiteSpec

MODES = ("reject", "amplify", "both")

# Directions whose QR diagonal falls below this fraction of the largest are linearly
# dependent on earlier ones and are dropped from an orthonormal basis.
_RANK_TOLERANCE = 1e-6


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """Return orthonormal rows spanning the same space as ``directions`` (rows), by QR.

    Rows that are linearly dependent on earlier rows are dropped, so the result may have
    fewer rows than the input.
    """
    if directions.shape[0] == 0:
        return directions.float()
    q, r = torch.linalg.qr(directions.double().T)
    diagonal = r.diagonal().abs()
    keep = diagonal > _RANK_TOLERANCE * diagonal.max().clamp_min(1e-30)
    return q[:, keep].T.float().contiguous()


def reject_direction(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Remove the component of each row of ``x`` along ``direction``."""
    coefficient = (x @ direction) / (direction @ direction)
    return x - coefficient.unsqueeze(-1) * direction


def amplify_direction(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Add to each row of ``x`` its component along ``direction`` once more."""
    coefficient = (x @ direction) / (direction @ direction)
    return x + coefficient.unsqueeze(-1) * direction


def robustify(
    x: torch.Tensor, harmful: torch.Tensor, helpful: torch.Tensor, *, mode: str = "both", renormalize: bool = False
) -> torch.Tensor:
    """Apply RoboShot's edit to embeddings ``x`` (..., width), computing in float32 or wider.

    ``mode`` "reject" uses only the harmful directions, "amplify" only the helpful ones,
    "both" rejects and then amplifies.
    """
    if mode not in MODES:
        raise ConfigError(f"invalid mode {mode!r}: choose one of {', '.join(MODES)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    edited = x.to(dtype)
    steps: list[tuple[Any, torch.Tensor]] = []
    if mode in ("reject", "both"):
        steps += [(reject_direction, direction) for direction in harmful.to(device=x.device, dtype=dtype)]
    if mode in ("amplify", "both"):
        steps += [(amplify_direction, direction) for direction in helpful.to(device=x.device, dtype=dtype)]
    for step, direction in steps:
        edited = step(edited, direction)
        if renormalize:
            edited = F.normalize(edited, dim=-1)
    return edited


class RoboShotProjection(Intervention):
    """RoboShot at an embedding site: reject harmful insight directions, amplify helpful ones.

    ``harmful`` and ``helpful`` are (count, width) tensors of insight directions (the
    difference of the two texts' unnormalised embeddings). With ``orthonormalize`` each set
    is replaced by an orthonormal basis of its span (QR) at construction, so the buffers
    saved in a bundle are that basis.

    The site must give one pooled embedding per input, a (batch, width) tensor: the
    ``embeddings`` site of a :class:`labhooks.zeroshot.ZeroShotClassifier` or of a CLIP
    model. A token-level site such as a BERT model's ``embeddings`` is rejected.
    """

    name = "roboshot_projection"
    width_parameters = {"harmful": -1, "helpful": -1}

    def __init__(
        self,
        site: str | SiteSpec | Site = "embeddings",
        harmful: torch.Tensor | None = None,
        helpful: torch.Tensor | None = None,
        *,
        mode: str = "both",
        orthonormalize: bool = False,
        renormalize: bool = False,
        positions: str | Positions | None = "all",
        width: int | None = None,
    ) -> None:
        super().__init__(site, positions)
        if mode not in MODES:
            raise ConfigError(f"invalid mode {mode!r}: choose one of {', '.join(MODES)}")
        harmful, helpful = self._directions(harmful, helpful, width)
        if mode == "reject" and harmful.shape[0] == 0:
            raise ConfigError("mode=reject needs at least one harmful direction")
        if mode == "amplify" and helpful.shape[0] == 0:
            raise ConfigError("mode=amplify needs at least one helpful direction")
        if mode == "both" and harmful.shape[0] + helpful.shape[0] == 0:
            raise ConfigError("RoboShot needs at least one harmful or helpful direction")
        if orthonormalize:
            harmful, helpful = orthonormal_basis(harmful), orthonormal_basis(helpful)
        self.register_buffer("harmful", harmful.detach().float().clone())
        self.register_buffer("helpful", helpful.detach().float().clone())
        self.mode = mode
        self.orthonormalize = bool(orthonormalize)
        self.renormalize = bool(renormalize)

    @staticmethod
    def _directions(harmful: torch.Tensor | None, helpful: torch.Tensor | None, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        given = [tensor for tensor in (harmful, helpful) if tensor is not None]
        for tensor in given:
            if tensor.dim() != 2:
                raise ConfigError(f"insight directions must have shape (count, width), got {tuple(tensor.shape)}")
        widths = {int(tensor.shape[1]) for tensor in given} | ({int(width)} if width is not None else set())
        if len(widths) != 1:
            raise ConfigError(f"harmful and helpful directions and width must agree on one width, got {sorted(widths)}")
        (size,) = widths
        empty = torch.zeros(0, size)
        return (harmful if harmful is not None else empty), (helpful if helpful is not None else empty)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the edited embeddings (..., width) in the input's dtype."""
        edited = robustify(embeddings, self.harmful, self.helpful, mode=self.mode, renormalize=self.renormalize)
        return edited.to(embeddings.dtype)

    def forward(self, hidden: torch.Tensor, context: InterventionContext) -> torch.Tensor:
        if hidden.dim() != 2:
            raise SiteError(
                f"roboshot_projection at site {context.site} got a tensor of shape {tuple(hidden.shape)}, but RoboShot "
                "edits one pooled embedding per input (batch, width). Attach it to the embeddings site of a "
                "labhooks.zeroshot.ZeroShotClassifier or of a CLIP model"
            )
        if hidden.shape[-1] != self.harmful.shape[-1]:
            raise SiteError(
                f"roboshot_projection at site {context.site}: the embedding width is {hidden.shape[-1]}, but the insight "
                f"directions have width {self.harmful.shape[-1]}; were they made with another encoder?"
            )
        return self.project(hidden)

    def config(self) -> dict[str, Any]:
        return {
            "num_harmful": int(self.harmful.shape[0]),
            "num_helpful": int(self.helpful.shape[0]),
            "width": int(self.harmful.shape[1]),
            "mode": self.mode,
            "orthonormalize": self.orthonormalize,
            "renormalize": self.renormalize,
        }

    @classmethod
    def from_config(cls, site: str, positions: str, config: Mapping[str, Any]) -> Intervention:
        options = dict(config)
        width = int(options.pop("width"))
        harmful = torch.zeros(int(options.pop("num_harmful")), width)
        helpful = torch.zeros(int(options.pop("num_helpful")), width)
        # The stored buffers are already orthonormal when the flag is set; rebuilding the
        # basis from zeros would drop every row.
        orthonormalize = bool(options.pop("orthonormalize", False))
        intervention = cls(site, harmful, helpful, positions=positions, width=width, **options)
        intervention.orthonormalize = orthonormalize
        return intervention

    def extra_repr(self) -> str:
        return (
            f"site={self.site}, harmful={self.harmful.shape[0]}, helpful={self.helpful.shape[0]}, "
            f"width={self.harmful.shape[1]}, mode={self.mode}, orthonormalize={self.orthonormalize}"
        )
