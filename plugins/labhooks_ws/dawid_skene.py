"""Dawid-Skene: a confusion matrix per source, fitted by expectation-maximisation.

Each source has a full confusion matrix P(label | true class). Sources are
conditionally independent given the true class, and abstains carry no information
about it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from labhooks.aggregators import ABSTAIN, Aggregator, AggregatorConfig
from labhooks.config import option
from labhooks_ws.votes import vote_shares

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DawidSkeneConfig(AggregatorConfig):
    max_iter: int = option(100, "maximum EM iterations", unit="iterations")
    tol: float = option(1e-6, "EM stops when the mean log-likelihood per example improves by less than this", unit="nats")
    smoothing: float = option(0.01, "pseudo-count added to every confusion-matrix cell, so no probability is zero")


class DawidSkene(Aggregator):
    """Dawid-Skene EM, initialised from majority-vote shares.

    The class balance is the one given (then held fixed), or else re-estimated in every
    M-step. The accuracies are sum_y P(Y = y) P(label = y | Y = y) for each source.
    """

    name = "dawid_skene"
    summary = "Dawid-Skene EM: one confusion matrix per source"
    plugin = "ws"
    config_class = DawidSkeneConfig

    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        uniform = np.full(cardinality, 1.0 / cardinality)
        posterior = vote_shares(matrix, cardinality, class_balance if class_balance is not None else uniform)
        previous = -np.inf
        for iteration in range(1, self.options.max_iter + 1):
            prior = class_balance if class_balance is not None else np.clip(posterior.mean(axis=0), 1e-6, None)
            prior = prior / prior.sum()
            self._confusion = self._estimate_confusion(matrix, posterior, cardinality)
            self.class_balance = prior
            log_joint = self._log_joint(matrix)
            peak = log_joint.max(axis=1, keepdims=True)
            likelihood = np.exp(log_joint - peak)
            total = likelihood.sum(axis=1, keepdims=True)
            posterior = likelihood / total
            log_likelihood = float(np.mean(np.log(total[:, 0]) + peak[:, 0]))
            if log_likelihood - previous < self.options.tol:
                logger.debug("dawid_skene: converged after %d iterations (log-likelihood %.6f)", iteration, log_likelihood)
                break
            previous = log_likelihood
        else:
            logger.info("dawid_skene: stopped at max_iter=%d before the log-likelihood converged", self.options.max_iter)

    def _estimate_confusion(self, matrix: np.ndarray, posterior: np.ndarray, cardinality: int) -> np.ndarray:
        confusion = np.full((matrix.shape[1], cardinality, cardinality), self.options.smoothing)
        for source, column in enumerate(matrix.T):
            voted = column != ABSTAIN
            labels = column[voted]
            weights = posterior[voted]
            for true_class in range(cardinality):
                confusion[source, true_class] += np.bincount(labels, weights=weights[:, true_class], minlength=cardinality)
        return confusion / confusion.sum(axis=2, keepdims=True)

    def _log_joint(self, matrix: np.ndarray) -> np.ndarray:
        assert self.class_balance is not None
        log_confusion = np.log(self._confusion)
        scores = np.tile(np.log(self.class_balance), (matrix.shape[0], 1))
        for source, column in enumerate(matrix.T):
            rows = np.flatnonzero(column != ABSTAIN)
            scores[rows] += log_confusion[source][:, column[rows]].T
        return scores

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        scores = self._log_joint(matrix)
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def _accuracies(self) -> np.ndarray:
        assert self.class_balance is not None
        diagonal = np.diagonal(self._confusion, axis1=1, axis2=2)
        return diagonal @ self.class_balance

    def _state(self) -> dict[str, np.ndarray]:
        return {"confusion": self._confusion}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        assert self.num_sources is not None and self.cardinality is not None
        self._confusion = self._restored(state, "confusion", (self.num_sources, self.cardinality, self.cardinality))
