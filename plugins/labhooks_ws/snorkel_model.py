"""Snorkel's LabelModel behind the aggregator contract.

The model itself comes from the ``snorkel`` package (matrix completion over the
sources' overlap statistics, conditionally independent sources). This module only
maps options, seeds the fit and saves the fitted parameters without pickle.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from labhooks.aggregators import Aggregator, AggregatorConfig
from labhooks.config import option

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SnorkelConfig(AggregatorConfig):
    n_epochs: int = option(100, "optimisation steps of LabelModel.fit (Snorkel's default is 100)", unit="steps")
    lr: float = option(0.01, "learning rate of LabelModel.fit (Snorkel's default is 0.01)")
    l2: float = option(0.0, "centred L2 regularisation strength of LabelModel.fit")
    optimizer: str = option("sgd", "optimizer of LabelModel.fit", choices=("sgd", "adam", "adamax"))


def _build_label_model(cardinality: int) -> object:
    from snorkel.labeling.model import LabelModel

    return LabelModel(cardinality=cardinality, verbose=False, device="cpu")


class SnorkelLabelModel(Aggregator):
    """Snorkel's ``LabelModel`` (snorkel 0.10), fitted with a fixed seed.

    Snorkel takes the class balance as a prior: the one given, or uniform classes when
    none is given (Snorkel does not estimate it). The accuracies are Snorkel's
    ``get_weights()``: P(source label = true label | the source votes). Needs at least
    three sources.
    """

    name = "snorkel"
    summary = "Snorkel's LabelModel (matrix completion, from the snorkel package)"
    plugin = "ws"
    config_class = SnorkelConfig
    min_sources = 3

    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        options = self.options
        model = _build_label_model(cardinality)
        balance = class_balance if class_balance is not None else np.full(cardinality, 1.0 / cardinality)
        model.fit(  # type: ignore[attr-defined]
            matrix,
            class_balance=balance.tolist(),
            n_epochs=options.n_epochs,
            lr=options.lr,
            l2=options.l2,
            optimizer=options.optimizer,
            seed=options.seed,
            progress_bar=False,
        )
        self._model = model
        self.class_balance = balance
        self._weights = np.asarray(model.get_weights(), dtype=np.float64)  # type: ignore[attr-defined]

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        return np.asarray(self._model.predict_proba(matrix), dtype=np.float64)  # type: ignore[attr-defined]

    def _accuracies(self) -> np.ndarray:
        return self._weights

    def _state(self) -> dict[str, np.ndarray]:
        mu = self._model.mu.detach().cpu().numpy().astype(np.float64)  # type: ignore[attr-defined]
        return {"mu": mu, "weights": self._weights}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        import torch
        from torch import nn

        assert self.cardinality is not None
        assert self.num_sources is not None
        assert self.class_balance is not None
        model = _build_label_model(self.cardinality)
        # NOTE: snorkel 0.10 saves only with pickle, so this sets the attributes that its
        # predict_proba reads (m, the clique tree, the class prior and mu) directly.
        model.m = self.num_sources  # type: ignore[attr-defined]
        model._create_tree()  # type: ignore[attr-defined]
        model._set_class_balance(self.class_balance.tolist(), None)  # type: ignore[attr-defined]
        mu = self._restored(state, "mu", (self.num_sources * self.cardinality, self.cardinality))
        model.mu = nn.Parameter(torch.from_numpy(mu.astype(np.float32)))  # type: ignore[attr-defined]
        self._model = model
        self._weights = self._restored(state, "weights", (self.num_sources,))
