"""Synthetic sources with known accuracies, for tests, benchmarks and reproductions.

Two generative models, both with conditionally independent sources:

* :func:`simulate_label_matrix`: source i gives the true class with probability
  ``accuracies[i]`` and otherwise one of the other classes uniformly at random.
* :func:`simulate_metric_sources`: labels are points of a finite metric space and
  source i outputs point l with probability proportional to exp(-theta_i d(l, y)^2)
  when the true label is y. Large theta means an accurate source; its errors land
  near the true label.

:func:`spider_metric` and :func:`discrete_metric` build the distance matrices used by
the reproductions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labhooks.aggregators import ABSTAIN, LabelMatrixError, validate_class_balance, validate_distance_matrix


def _true_labels(generator: np.random.Generator, count: int, cardinality: int, class_balance: Sequence[float] | None) -> np.ndarray:
    balance = validate_class_balance(class_balance, cardinality)
    return generator.choice(cardinality, size=count, p=balance)


def _apply_coverage(generator: np.random.Generator, matrix: np.ndarray, coverage: Sequence[float] | None) -> None:
    if coverage is None:
        return
    if len(coverage) != matrix.shape[1]:
        raise LabelMatrixError(
            f"coverage has {len(coverage)} entries for {matrix.shape[1]} sources; give one voting probability per source"
        )
    for source, probability in enumerate(coverage):
        matrix[generator.random(matrix.shape[0]) >= probability, source] = ABSTAIN


def simulate_label_matrix(
    count: int,
    accuracies: Sequence[float],
    cardinality: int = 2,
    *,
    class_balance: Sequence[float] | None = None,
    coverage: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (label matrix (count, m), true labels (count,)) with uniform errors.

    Source i votes with probability ``coverage[i]`` (default: always), independently of
    everything else, and is then right with probability ``accuracies[i]``.
    """
    if cardinality < 2:
        raise LabelMatrixError(f"cardinality must be at least 2, got {cardinality}")
    generator = np.random.default_rng(seed)
    truth = _true_labels(generator, count, cardinality, class_balance)
    matrix = np.empty((count, len(accuracies)), dtype=np.int64)
    for source, accuracy in enumerate(accuracies):
        correct = generator.random(count) < accuracy
        wrong = (truth + generator.integers(1, cardinality, size=count)) % cardinality
        matrix[:, source] = np.where(correct, truth, wrong)
    _apply_coverage(generator, matrix, coverage)
    return matrix, truth


def metric_source_distributions(distances: np.ndarray, theta: float) -> np.ndarray:
    """Return P(output = l | Y = y) = exp(-theta d(l, y)^2) / Z(y) as a (k, k) array indexed [y, l]."""
    squared = np.asarray(distances, dtype=np.float64) ** 2
    logits = -theta * squared
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def metric_source_accuracies(distances: np.ndarray, thetas: Sequence[float], class_balance: Sequence[float] | None = None) -> np.ndarray:
    """Return each source's expected accuracy P(output = Y) under the metric source model."""
    points = len(distances)
    balance = validate_class_balance(class_balance, points)
    weights = balance if balance is not None else np.full(points, 1.0 / points)
    return np.array([np.diagonal(metric_source_distributions(distances, theta)) @ weights for theta in thetas])


def simulate_metric_sources(
    distances: np.ndarray,
    thetas: Sequence[float],
    count: int,
    *,
    class_balance: Sequence[float] | None = None,
    coverage: Sequence[float] | None = None,
    seed: int = 0,
    truth: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (label matrix (count, m), true labels (count,)) drawn from the metric source model.

    ``truth`` fixes the true labels instead of drawing them from the class balance.
    """
    distances = validate_distance_matrix(distances)
    generator = np.random.default_rng(seed)
    if truth is None:
        truth = _true_labels(generator, count, len(distances), class_balance)
    matrix = np.empty((len(truth), len(thetas)), dtype=np.int64)
    for source, theta in enumerate(thetas):
        cumulative = np.cumsum(metric_source_distributions(distances, theta)[truth], axis=1)
        draws = generator.random((len(truth), 1)) * cumulative[:, -1:]
        matrix[:, source] = np.minimum((cumulative < draws).sum(axis=1), len(distances) - 1)
    _apply_coverage(generator, matrix, coverage)
    return matrix, np.asarray(truth)


def discrete_metric(points: int) -> np.ndarray:
    """Return the distance matrix of ``points`` labels at distance 1 from each other (plain classification)."""
    return 1.0 - np.eye(points)


def spider_metric(branch_length: int, branches: int = 3) -> np.ndarray:
    """Return the path distances of a tree with a centre node and ``branches`` paths of ``branch_length`` nodes.

    Node 0 is the centre; node 1 + b * branch_length + (t - 1) is the node at depth t
    on branch b. The tree has branches * branch_length + 1 nodes.
    """
    if branch_length < 1 or branches < 1:
        raise LabelMatrixError(f"a spider tree needs branch_length >= 1 and branches >= 1, got {branch_length} and {branches}")
    branch = np.concatenate([[-1], np.repeat(np.arange(branches), branch_length)])
    depth = np.concatenate([[0], np.tile(np.arange(1, branch_length + 1), branches)])
    same_branch = branch[:, None] == branch[None, :]
    along = np.abs(depth[:, None] - depth[None, :])
    through_centre = depth[:, None] + depth[None, :]
    return np.where(same_branch, along, through_centre).astype(np.float64)
