"""Vote statistics of a validated label matrix, shared by the aggregators.

Every function takes an integer matrix of shape (n examples, m sources) whose entries
are class labels or -1 (abstain), as :func:`labhooks.aggregators.validate_label_matrix`
returns it.
"""

from __future__ import annotations

import numpy as np

from labhooks.aggregators import ABSTAIN


def vote_counts(matrix: np.ndarray, cardinality: int) -> np.ndarray:
    """Return how many sources vote for each class, shape (n, cardinality)."""
    counts = np.zeros((matrix.shape[0], cardinality))
    for column in matrix.T:
        rows = np.flatnonzero(column != ABSTAIN)
        # One source gives each row at most one label, so no index repeats here.
        counts[rows, column[rows]] += 1
    return counts


def vote_shares(matrix: np.ndarray, cardinality: int, fallback: np.ndarray) -> np.ndarray:
    """Return each row's share of votes per class; rows without votes get ``fallback``."""
    counts = vote_counts(matrix, cardinality)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    shares[totals[:, 0] == 0] = fallback
    return shares


def pairwise_agreement(matrix: np.ndarray, cardinality: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (agree, overlap), both (m, m): the fraction of examples where sources i and j
    both vote and give the same label, and the fraction where both vote."""
    n, m = matrix.shape
    votes = (matrix != ABSTAIN).astype(np.float32)
    overlap = votes.T @ votes
    if cardinality <= m:
        agree = np.zeros((m, m), dtype=np.float64)
        for label in range(cardinality):
            indicator = (matrix == label).astype(np.float32)
            agree += indicator.T @ indicator
    else:
        agree = np.zeros((m, m), dtype=np.float64)
        for i in range(m):
            voted = matrix[:, i] != ABSTAIN
            for j in range(i, m):
                agree[i, j] = agree[j, i] = np.count_nonzero(voted & (matrix[:, i] == matrix[:, j]))
    return agree / n, overlap.astype(np.float64) / n


def distinct_rows(matrix: np.ndarray, cardinality: int, max_codes: int = 1 << 22) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (distinct rows, how often each occurs), or None when there could be more than ``max_codes`` distinct rows.

    Each row is read as a number in base k + 1 (label + 1 per digit), so counting the
    rows is one pass and a ``np.bincount``, much cheaper than sorting them.
    """
    base = cardinality + 1
    sources = matrix.shape[1]
    if base**sources > max_codes:
        return None
    powers = base ** np.arange(sources, dtype=np.int64)
    codes = np.einsum("ij,j->i", matrix, powers) + powers.sum()
    counts = np.bincount(codes, minlength=base**sources)
    present = np.flatnonzero(counts)
    digits = (present[:, None] // powers[None, :]) % base - 1
    return digits, counts[present].astype(np.float64)


def snake_groups(order: np.ndarray, count: int = 3) -> list[list[int]]:
    """Deal sources into ``count`` groups in snake order (0, 1, 2, 2, 1, 0, 0, ...).

    With ``order`` ranking the sources from most to least reliable, every group gets
    a reliable source, which keeps each view of a multi-view model informative.
    """
    groups: list[list[int]] = [[] for _ in range(count)]
    for rank, source in enumerate(order):
        cycle, position = divmod(rank, count)
        groups[position if cycle % 2 == 0 else count - 1 - position].append(int(source))
    return groups
