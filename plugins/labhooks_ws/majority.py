"""Majority vote: the baseline label model."""

from __future__ import annotations

import numpy as np

from labhooks.aggregators import ABSTAIN, Aggregator, AggregatorConfig
from labhooks_ws.votes import vote_counts, vote_shares


class MajorityVote(Aggregator):
    """Majority vote: each example gets the class that most of its voting sources give.

    ``predict_proba`` is each row's share of votes per class; a row without votes gets
    the class balance. Ties are broken by :meth:`predict` (seeded, uniformly among the
    tied classes, unless ``tie_break="abstain"``). The class balance is the one given,
    or else the mean vote share over rows with at least one vote.

    The accuracies are each source's agreement with the majority label on the examples
    where it votes. That is not a model-based estimate: it is biased towards the
    majority, most of all with few sources.
    """

    name = "majority_vote"
    summary = "majority vote (plurality of the non-abstaining sources, seeded tie-breaking)"
    plugin = "ws"
    config_class = AggregatorConfig

    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        if class_balance is None:
            counts = vote_counts(matrix, cardinality)
            totals = counts.sum(axis=1, keepdims=True)
            voted = totals[:, 0] > 0
            class_balance = (counts[voted] / totals[voted]).mean(axis=0)
            class_balance = np.clip(class_balance, 1e-6, None)
            class_balance = class_balance / class_balance.sum()
        self.class_balance = class_balance

        labels = self.predict(matrix)
        agreement = np.full(matrix.shape[1], np.nan)
        for source, column in enumerate(matrix.T):
            voted = column != ABSTAIN
            if voted.any():
                agreement[source] = float(np.mean(column[voted] == labels[voted]))
        self._agreement = agreement

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        assert self.cardinality is not None and self.class_balance is not None
        return vote_shares(matrix, self.cardinality, self.class_balance)

    def _accuracies(self) -> np.ndarray:
        return self._agreement

    def _state(self) -> dict[str, np.ndarray]:
        return {"agreement": self._agreement}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        assert self.num_sources is not None
        self._agreement = self._restored(state, "agreement", (self.num_sources,))
