"""Pair filtering, the per-layer preference subspace, and the ranking of layers to edit.

Per layer, the differences ``preferred - dispreferred`` of the kept pairs are stacked and
decomposed with an SVD (uncentred, so the mean difference counts as signal). The top right
singular vectors up to a cumulative explained variance, capped by a maximum count, span the
layer's preference subspace. The SVD fixes each vector only up to its sign, so every
direction is flipped to give the mean difference a positive projection onto it. A positive
projection then means "more like the preferred responses".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from labhooks_alignez.intervention import MODE_SIGNS, kept_directions

MIN_PAIRS = 2


def keep_pairs(preferred: torch.Tensor, dispreferred: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return a bool mask of the pairs whose two representations have cosine similarity <= threshold.

    Near-identical representations carry no preference signal, only noise. Inputs have
    shape (pairs, width); a pair with a zero vector has similarity 0 and is kept.
    """
    similarity = torch.nn.functional.cosine_similarity(preferred.double(), dispreferred.double(), dim=-1, eps=1e-12)
    return similarity <= threshold


def explained_variance_count(singular_values: torch.Tensor, fraction: float, max_count: int) -> int:
    """Return how many leading singular vectors reach ``fraction`` of the variance, at most ``max_count``.

    The variance share of vector i is ``s_i**2 / sum(s**2)``. Returns 0 when every singular
    value is zero.
    """
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy / total, dim=0)
    # The small tolerance keeps fraction=1.0 reachable despite rounding in the cumulative sum.
    count = int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=cumulative.dtype)).item()) + 1
    nonzero = int((energy > total * 1e-12).sum())
    return min(count, nonzero, max_count)


def preference_directions(differences: torch.Tensor, explained_variance: float, max_directions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the oriented preference directions (k, width) of stacked differences, and their variance shares."""
    width = differences.shape[-1]
    if differences.shape[0] == 0:
        return torch.zeros(0, width), torch.zeros(0)
    _, singular_values, right = torch.linalg.svd(differences.double(), full_matrices=False)
    count = explained_variance_count(singular_values, explained_variance, max_directions)
    directions = right[:count]

    signs = torch.sign(differences.double().mean(0) @ directions.T)
    directions = directions * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)
    shares = singular_values[:count] ** 2 / (singular_values**2).sum()
    return directions.float(), shares.float()


@dataclass
class LayerFit:
    """The fitted subspace of one axis at one layer."""

    layer: int
    directions: torch.Tensor
    variance_shares: torch.Tensor
    pairs_kept: int


def fit_layers(
    preferred: torch.Tensor,
    dispreferred: torch.Tensor,
    layers: Sequence[int],
    *,
    threshold: float,
    explained_variance: float,
    max_directions: int,
) -> list[LayerFit]:
    """Fit one axis's subspace at every layer from (pairs, layers, width) representations.

    A layer with fewer than two kept pairs gets no directions.
    """
    fits = []
    for index, layer in enumerate(layers):
        kept = keep_pairs(preferred[:, index], dispreferred[:, index], threshold)
        count = int(kept.sum())
        if count < MIN_PAIRS:
            fits.append(LayerFit(layer, torch.zeros(0, preferred.shape[-1]), torch.zeros(0), count))
            continue
        differences = preferred[kept, index] - dispreferred[kept, index]
        directions, shares = preference_directions(differences, explained_variance, max_directions)
        fits.append(LayerFit(layer, directions, shares, count))
    return fits


def projected_edit(states: torch.Tensor, directions: torch.Tensor, mode: str, weight: float) -> torch.Tensor:
    """Return, per row of ``states`` (rows, width), the norm of the weighted projection of the unit state onto its kept directions.

    This measures how much of the state lies in the part of the subspace the edit acts on,
    independently of the state's norm, which grows from layer to layer.
    """
    if directions.shape[0] == 0:
        return torch.zeros(states.shape[0])
    unit = torch.nn.functional.normalize(states.float(), dim=-1)
    scores = unit @ directions.T
    kept = kept_directions(scores, torch.full((directions.shape[0],), MODE_SIGNS[mode]))
    projection = (scores * kept * weight) @ directions
    return projection.norm(dim=-1)


def rank_layers(
    query_states: torch.Tensor, fits_by_axis: Sequence[Sequence[LayerFit]], modes: Sequence[str], weights: Sequence[float]
) -> torch.Tensor:
    """Return the mean projected edit per layer over the queries, summed over axes: shape (layers,).

    ``query_states`` has shape (queries, layers, width), in the layer order of the fits.
    """
    totals = torch.zeros(query_states.shape[1])
    for fits, mode, weight in zip(fits_by_axis, modes, weights, strict=True):
        for index, fit in enumerate(fits):
            totals[index] += projected_edit(query_states[:, index], fit.directions, mode, weight).mean()
    return totals


def choose_layers(scores: torch.Tensor, has_directions: Sequence[bool], top: int) -> list[int]:
    """Return the positions (in fit order) of the ``top`` best-scoring layers that have directions; 0 keeps all."""
    candidates = [index for index, present in enumerate(has_directions) if present]
    if top and len(candidates) > top:
        candidates = sorted(candidates, key=lambda index: float(scores[index]), reverse=True)[:top]
    return sorted(candidates)
