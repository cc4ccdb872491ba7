"""Tensor decomposition: sources as a multi-view mixture model.

Conditionally on the true class y, the sources' votes are independent. Split the
sources into three groups and encode each group's votes as a concatenation of one-hot
vectors (one slot per class plus one for abstain): the three group vectors x1, x2, x3
are then three views of a mixture, and their third moment is

    E[x1 (x) x2 (x) x3] = sum_y P(Y = y) mu1_y (x) mu2_y (x) mu3_y,

where mu_v,y stacks the conditional distributions P(label | Y = y) of the group's
sources. A rank-k CP decomposition of the empirical third moment (tensorly's
non-negative HALS) recovers these per-class means, hence every source's
conditional distribution and the class balance.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from labhooks.aggregators import ABSTAIN, Aggregator, AggregatorConfig
from labhooks.config import option
from labhooks_ws.votes import snake_groups, vote_shares

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TensorConfig(AggregatorConfig):
    n_iter_max: int = option(500, "maximum iterations of the non-negative CP decomposition (tensorly HALS)", unit="iterations")
    tol: float = option(1e-10, "the decomposition stops when the relative reconstruction error changes by less than this")
    min_probability: float = option(1e-4, "floor for the recovered probabilities P(label | class) and the class balance")


def third_moment(codes: list[np.ndarray], widths: list[int]) -> np.ndarray:
    """Return E[x1 (x) x2 (x) x3] for one-hot group vectors given as slot indices.

    ``codes[v]`` has shape (n, sources in group v): the slot each source's vote
    occupies in the group vector. The moment is a sum over one source per group,
    counted with ``np.bincount`` on the joint slot index.
    """
    count = codes[0].shape[0]
    size = widths[0] * widths[1] * widths[2]
    flat = np.zeros(size)
    for first in codes[0].T:
        for second in codes[1].T:
            for third in codes[2].T:
                joint = (first * widths[1] + second) * widths[2] + third
                flat += np.bincount(joint, minlength=size)
    return flat.reshape(widths) / count


def group_codes(matrix: np.ndarray, groups: list[list[int]], cardinality: int) -> list[np.ndarray]:
    """Return the slot of each source's vote in its group vector; abstain uses the last slot of its block."""
    codes = []
    for group in groups:
        block = cardinality + 1
        slots = np.where(matrix[:, group] == ABSTAIN, cardinality, matrix[:, group])
        codes.append(slots + block * np.arange(len(group))[None, :])
    return codes


def conditional_means(codes: np.ndarray, width: int, posterior: np.ndarray) -> np.ndarray:
    """Return the group vector's mean under each class of a soft labelling, shape (width, k)."""
    columns = [
        np.bincount(codes.reshape(-1), weights=np.repeat(posterior[:, label], codes.shape[1]), minlength=width)
        for label in range(posterior.shape[1])
    ]
    means = np.stack(columns, axis=1)
    return means / np.clip(posterior.sum(axis=0), 1e-12, None)


class TensorDecomposition(Aggregator):
    """The multi-view tensor method with one-hot source views (see the module docstring).

    Sources are dealt to the three views in snake order of their agreement with the
    majority vote, so every view contains a reliable source. The decomposition starts
    from the majority-vote conditional means and weights. Components are matched to
    classes by the assignment that maximises the summed probability of voting for the
    matched class (sources are assumed better than random).

    The conditional tables include abstain as an outcome. The accuracies are
    P(label = Y | the source votes); the class balance is the given one, or else the
    recovered mixture weights. Needs at least three sources.
    """

    name = "tensor"
    summary = "tensor decomposition of the third moment of one-hot source views (tensorly CP)"
    plugin = "ws"
    config_class = TensorConfig
    min_sources = 3

    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        from scipy.optimize import linear_sum_assignment
        from tensorly.cp_tensor import CPTensor
        from tensorly.decomposition import non_negative_parafac_hals

        count, sources = matrix.shape
        block = cardinality + 1
        floor = self.options.min_probability

        uniform = np.full(cardinality, 1.0 / cardinality)
        shares = vote_shares(matrix, cardinality, uniform)
        majority = self._break_ties(shares, "random")
        agreement = [
            np.mean(column[column != ABSTAIN] == majority[column != ABSTAIN]) if (column != ABSTAIN).any() else 0.0 for column in matrix.T
        ]
        groups = snake_groups(np.argsort(agreement, kind="stable")[::-1])
        codes = group_codes(matrix, groups, cardinality)
        widths = [len(group) * block for group in groups]
        moment = third_moment(codes, widths)

        initial_weights = np.clip(shares.mean(axis=0), floor, None)
        initial_factors = [np.clip(conditional_means(code, width, shares), floor, None) for code, width in zip(codes, widths, strict=True)]
        decomposition = non_negative_parafac_hals(
            moment,
            rank=cardinality,
            init=CPTensor((initial_weights, initial_factors)),
            n_iter_max=self.options.n_iter_max,
            tol=self.options.tol,
        )
        weights = np.asarray(decomposition.weights, dtype=np.float64).copy()
        factors = [np.asarray(factor, dtype=np.float64) for factor in decomposition.factors]

        # Each source block of a factor column is a distribution over k + 1 outcomes, so the
        # block sums carry the scale that belongs to the mixture weight.
        tables = np.zeros((sources, block, cardinality))
        for group, factor in zip(groups, factors, strict=True):
            blocks = factor.reshape(len(group), block, cardinality)
            sums = blocks.sum(axis=1)
            weights = weights * sums.mean(axis=0)
            for position, source in enumerate(group):
                tables[source] = blocks[position] / np.clip(sums[position], 1e-12, None)

        score = np.einsum("sly->ly", tables[:, :cardinality, :])
        label_of_row, component = linear_sum_assignment(-score)
        order = component[np.argsort(label_of_row)]
        tables = tables[:, :, order]
        weights = weights[order]

        tables = np.clip(tables, floor, None)
        self._tables = tables / tables.sum(axis=1, keepdims=True)
        if class_balance is None:
            estimated = np.clip(weights, floor, None)
            class_balance = estimated / estimated.sum()
        self.class_balance = class_balance
        logger.debug("tensor: views %s, recovered class balance %s", groups, np.round(self.class_balance, 4).tolist())

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        assert self.class_balance is not None and self.cardinality is not None
        log_tables = np.log(self._tables)
        scores = np.tile(np.log(self.class_balance), (matrix.shape[0], 1))
        for source, column in enumerate(matrix.T):
            outcome = np.where(column == ABSTAIN, self.cardinality, column)
            scores += log_tables[source][outcome]
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def _accuracies(self) -> np.ndarray:
        assert self.class_balance is not None and self.cardinality is not None
        correct = np.diagonal(self._tables[:, : self.cardinality, :], axis1=1, axis2=2) @ self.class_balance
        voting = (1.0 - self._tables[:, self.cardinality, :]) @ self.class_balance
        return correct / np.clip(voting, 1e-12, None)

    @property
    def conditional_tables(self) -> np.ndarray:
        """Recovered P(label | Y = y), shape (m, k + 1, k); row k is the abstain probability."""
        self._check_fitted()
        return self._tables

    def _state(self) -> dict[str, np.ndarray]:
        return {"tables": self._tables}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        assert self.num_sources is not None and self.cardinality is not None
        self._tables = self._restored(state, "tables", (self.num_sources, self.cardinality + 1, self.cardinality))
