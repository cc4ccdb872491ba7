"""FlyingSquid's triplet method: closed-form source accuracies from second moments.

For a binary task with labels coded as Y in {-1, +1} and votes as lambda in {-1, 0, +1}
(0 = abstain), conditionally independent sources whose errors do not depend on the
class satisfy E[lambda_i lambda_j] = E[lambda_i Y] E[lambda_j Y]. Any three sources
i, j, k then give

    |E[lambda_i Y]| = sqrt(|E[lambda_i lambda_j] E[lambda_i lambda_k] / E[lambda_j lambda_k]|),

and the sign is fixed by assuming every source is better than random. This module
implements that estimator itself. The ``flyingsquid`` package on PyPI (0.0.0a0, 2020)
imports pgmpy's ``MarkovModel`` and declares no dependencies or versions.
"""

from __future__ import annotations

import dataclasses
import logging
from itertools import combinations

import numpy as np

from labhooks.aggregators import ABSTAIN, Aggregator, AggregatorConfig
from labhooks.config import option
from labhooks_ws.votes import distinct_rows, pairwise_agreement

logger = logging.getLogger(__name__)

# Accuracies are kept inside (0.5, 1) so that log-odds weights stay finite.
_MAX_ACCURACY = 1.0 - 1e-6


@dataclasses.dataclass
class FlyingSquidConfig(AggregatorConfig):
    multiclass: str = option(
        "one_vs_rest",
        "with more than two classes: one binary triplet model per class, as FlyingSquid does (one_vs_rest), "
        "or one model whose errors spread evenly over the other classes (symmetric)",
        choices=("one_vs_rest", "symmetric"),
    )
    min_denominator: float = option(1e-4, "triplets whose denominator |E[lambda_j lambda_k]| is below this are skipped")


def triplet_magnitudes(moments: np.ndarray, min_denominator: float) -> np.ndarray:
    """Return |E[lambda_i Y]| for every source from the second-moment matrix E[lambda lambda^T].

    Each triplet (i, j, k) gives one estimate; the estimates of source i are averaged
    with weights |E[lambda_j lambda_k]|, because a small denominator amplifies sampling
    noise. A source without any usable triplet gets 0 (no information).
    """
    count = moments.shape[0]
    magnitudes = np.zeros(count)
    unusable = []
    for source in range(count):
        others = [other for other in range(count) if other != source]
        numerator = 0.0
        total_weight = 0.0
        for j, k in combinations(others, 2):
            denominator = abs(moments[j, k])
            if denominator < min_denominator:
                continue
            estimate = np.sqrt(abs(moments[source, j] * moments[source, k]) / denominator)
            numerator += denominator * estimate
            total_weight += denominator
        if total_weight > 0:
            magnitudes[source] = numerator / total_weight
        else:
            unusable.append(source)
    if unusable:
        logger.debug(
            "flyingsquid: sources %s have no usable triplet (no two partners vote together often enough); they get no weight", unusable
        )
    return magnitudes


def _signed_votes(matrix: np.ndarray, positive: int, cardinality: int) -> np.ndarray:
    """Return votes coded +1 (label == positive), -1 (another label) and 0 (abstain), as float32."""
    # One lookup per entry: index -1 (abstain) reads the last slot, which is 0.
    codes = np.full(cardinality + 1, -1.0, dtype=np.float32)
    codes[positive] = 1.0
    codes[cardinality] = 0.0
    return np.take(codes, matrix)


def fit_binary(
    signed: np.ndarray, min_denominator: float, positive_rate: float | None, weights: np.ndarray | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Fit the binary triplet model on +1/-1/0 votes; return (accuracies, P(Y = +1), coverage).

    The accuracy is P(vote = Y | the source votes). ``weights`` counts how often each
    row occurs (for distinct rows). Without ``positive_rate``, E[Y] is estimated from
    E[lambda_i] = E[lambda_i Y] E[Y] by least squares over sources.
    """
    if weights is None:
        weighted = signed
        total = float(signed.shape[0])
    else:
        weighted = signed * weights[:, None].astype(signed.dtype)
        total = float(weights.sum())
    moments = (weighted.T @ signed).astype(np.float64) / total
    # A vote squared is 1 and an abstain 0, so the diagonal of the moments is the coverage.
    coverage = np.diagonal(moments).copy()
    correlation = np.minimum(triplet_magnitudes(moments, min_denominator), coverage)
    accuracies = np.full(signed.shape[1], 0.5)
    voted = coverage > 0
    accuracies[voted] = np.clip(0.5 * (1.0 + correlation[voted] / coverage[voted]), 0.5, _MAX_ACCURACY)

    if positive_rate is None:
        means = weighted.sum(axis=0, dtype=np.float64) / total
        strength = float(correlation @ correlation)
        expected_y = float(correlation @ means) / strength if strength > 0 else 0.0
        positive_rate = 0.5 * (1.0 + float(np.clip(expected_y, -0.98, 0.98)))
    return accuracies, positive_rate, coverage


def binary_posterior(signed: np.ndarray, accuracies: np.ndarray, positive_rate: float) -> np.ndarray:
    """Return P(Y = +1 | votes) for conditionally independent sources with these accuracies."""
    weights = np.log(accuracies / (1.0 - accuracies))
    logit = np.log(positive_rate / (1.0 - positive_rate)) + signed.astype(np.float64) @ weights
    return 1.0 / (1.0 + np.exp(-logit))


class FlyingSquid(Aggregator):
    """FlyingSquid's triplet method, written in this project.

    Binary tasks use the triplet estimator of the module docstring on the raw second
    moments, with class 1 as Y = +1. Posteriors follow from the estimated accuracies
    (naive Bayes over the voting sources). The class balance is the one given, or else
    estimated from the first moments.

    With more than two classes, ``multiclass="one_vs_rest"`` (the default, as
    FlyingSquid does it) fits one binary model per class (class c against the rest)
    and normalises the per-class posteriors. A source's multiclass accuracy then
    follows exactly from its one-versus-rest accuracies a_c: P(correct) =
    (sum_c a_c - (k - 2)) / 2. The one-versus-rest models assume errors that do not
    depend on the class, which fails when a source's errors spread over k - 1 classes,
    so these estimates are biased for k > 2.

    ``multiclass="symmetric"`` instead codes votes as one-hot vectors minus 1/k.
    Suppose each source is right with probability alpha_i and otherwise picks one of
    the other classes uniformly. Then the inner products of these vectors factor as in
    the binary case, and the same triplet estimator recovers alpha_i.
    """

    name = "flyingsquid"
    summary = "FlyingSquid triplet method: closed-form accuracies from second moments (one-versus-rest for multiclass)"
    plugin = "ws"
    config_class = FlyingSquidConfig
    min_sources = 3

    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        minimum = self.options.min_denominator
        if cardinality == 2:
            # The moments only depend on how often each row of votes occurs.
            compressed = distinct_rows(matrix, cardinality)
            rows, counts = compressed if compressed is not None else (matrix, None)
            accuracies, positive_rate, self.coverage = fit_binary(
                _signed_votes(rows, 1, 2), minimum, None if class_balance is None else float(class_balance[1]), counts
            )
            self._class_accuracies = accuracies[None, :]
            self._binary_rates = np.array([positive_rate])
            self._accuracy = accuracies
            self.class_balance = np.array([1.0 - positive_rate, positive_rate])
        elif self.options.multiclass == "one_vs_rest":
            self._fit_one_vs_rest(matrix, cardinality, class_balance)
        else:
            self._fit_symmetric(matrix, cardinality, class_balance)

    def _fit_one_vs_rest(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        per_class = np.zeros((cardinality, matrix.shape[1]))
        rates = np.zeros(cardinality)
        compressed = distinct_rows(matrix, cardinality)
        rows, counts = compressed if compressed is not None else (matrix, None)
        for label in range(cardinality):
            given = None if class_balance is None else float(class_balance[label])
            per_class[label], rates[label], self.coverage = fit_binary(
                _signed_votes(rows, label, cardinality), self.options.min_denominator, given, counts
            )
        self._class_accuracies = per_class
        self._binary_rates = rates
        # Summed over classes, the one-versus-rest agreements of a vote equal k - 2 + 2 * [vote correct].
        self._accuracy = np.clip((per_class.sum(axis=0) - (cardinality - 2)) / 2.0, 0.0, 1.0)
        self.class_balance = class_balance if class_balance is not None else rates / rates.sum()

    def _fit_symmetric(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        agree, overlap = pairwise_agreement(matrix, cardinality)
        # E[<x_i, x_j>] for x = one_hot(vote) - 1/k is agree - overlap / k, and under the
        # symmetric model it equals (c_i beta_i)(c_j beta_j)(1 - 1/k), where c is the
        # coverage and beta = (k alpha - 1) / (k - 1).
        moments = agree - overlap / cardinality
        coverage = np.diag(overlap)
        strength = triplet_magnitudes(moments, self.options.min_denominator) / np.sqrt(1.0 - 1.0 / cardinality)
        beta = np.divide(strength, coverage, out=np.zeros_like(strength), where=coverage > 0)
        beta = np.clip(beta, 0.0, 1.0)
        self._accuracy = np.clip(((cardinality - 1) * beta + 1.0) / cardinality, 1.0 / cardinality, _MAX_ACCURACY)

        if class_balance is None:
            # E[x_i] = c_i beta_i (p - 1/k), so p - 1/k is a least-squares fit over sources.
            shares = np.stack([(matrix == label).mean(axis=0) for label in range(cardinality)], axis=1)
            centred = shares - coverage[:, None] / cardinality
            weight = strength * np.sqrt(1.0 - 1.0 / cardinality)
            denominator = float(weight @ weight)
            offset = (weight @ centred) / denominator if denominator > 0 else np.zeros(cardinality)
            class_balance = np.clip(1.0 / cardinality + offset, 1e-3, None)
            class_balance = class_balance / class_balance.sum()
        self.class_balance = class_balance
        self._class_accuracies = np.zeros((0, matrix.shape[1]))
        self._binary_rates = np.zeros(0)

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        assert self.cardinality is not None and self.class_balance is not None
        if self.cardinality == 2:
            positive = binary_posterior(_signed_votes(matrix, 1, 2), self._class_accuracies[0], float(self._binary_rates[0]))
            return np.stack([1.0 - positive, positive], axis=1)
        if self._class_accuracies.shape[0] == self.cardinality:
            scores = np.stack(
                [
                    binary_posterior(
                        _signed_votes(matrix, label, self.cardinality), self._class_accuracies[label], float(self._binary_rates[label])
                    )
                    for label in range(self.cardinality)
                ],
                axis=1,
            )
            scores = np.clip(scores, 1e-300, None)
            return scores / scores.sum(axis=1, keepdims=True)
        return self._symmetric_posterior(matrix)

    def _symmetric_posterior(self, matrix: np.ndarray) -> np.ndarray:
        assert self.cardinality is not None and self.class_balance is not None
        count = self.cardinality
        log_right = np.log(self._accuracy)
        log_wrong = np.log((1.0 - self._accuracy) / (count - 1))
        scores = np.tile(np.log(self.class_balance), (matrix.shape[0], 1))
        for source, column in enumerate(matrix.T):
            rows = np.flatnonzero(column != ABSTAIN)
            scores[rows] += log_wrong[source]
            scores[rows, column[rows]] += log_right[source] - log_wrong[source]
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def _accuracies(self) -> np.ndarray:
        return self._accuracy

    def _state(self) -> dict[str, np.ndarray]:
        return {"accuracies": self._accuracy, "class_accuracies": self._class_accuracies, "binary_rates": self._binary_rates}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        assert self.num_sources is not None
        self._accuracy = self._restored(state, "accuracies", (self.num_sources,))
        rates = np.asarray(state["binary_rates"])
        self._binary_rates = self._restored(state, "binary_rates", (rates.shape[0],))
        self._class_accuracies = self._restored(state, "class_accuracies", (rates.shape[0], self.num_sources))
