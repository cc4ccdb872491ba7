"""Seeded experiments on simulated sources, used by the benchmarks and the tests.

Each function returns a :class:`labhooks.ReportTable` of aggregate accuracies (the
fraction of examples whose aggregated label is correct), averaged over seeds.

* :func:`synthetic_experiment`: sources with known accuracies and uniform errors; the
  largest error of each label model's estimated accuracies, and its aggregate accuracy.
* :func:`cardinality_experiment`: three sources with theta = (4, 0.5, 0.5) on plain
  classification (every wrong class at distance 1), cardinality growing.
* :func:`tree_experiment`: the same sources on the nodes of a tree with three branches
  of b nodes, b growing; errors land near the true node.
* :func:`game24_experiment`: three sources of noisy game-of-24 expressions with
  theta = (5, 0.6, 0.5); an aggregated expression is correct when it makes 24.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from labhooks.aggregators import Aggregator
from labhooks.methods import ReportTable
from labhooks_ws import game24
from labhooks_ws.dawid_skene import DawidSkene
from labhooks_ws.majority import MajorityVote
from labhooks_ws.pseudo_euclidean import PseudoEuclidean
from labhooks_ws.simulate import discrete_metric, simulate_label_matrix, simulate_metric_sources, spider_metric
from labhooks_ws.snorkel_model import SnorkelLabelModel
from labhooks_ws.tensor import TensorDecomposition
from labhooks_ws.triplet import FlyingSquid

logger = logging.getLogger(__name__)

Builder = Callable[[np.ndarray], Aggregator]
_PSE_COLUMNS = ("pse (tensor step)", "pse (tensor + likelihood)")


def _accuracy(model: Aggregator, matrix: np.ndarray, cardinality: int, correct: Callable[[np.ndarray], np.ndarray]) -> float:
    model.fit(matrix, cardinality=cardinality)
    return float(np.mean(correct(model.predict(matrix))))


def _pse_accuracies(distances: np.ndarray, matrix: np.ndarray, correct: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """Return the accuracy with the tensor-step theta and with the refined theta, from one fit."""
    model = PseudoEuclidean(distances).fit(matrix)
    assert isinstance(model, PseudoEuclidean) and model.tensor_thetas is not None
    tensor_only = model.with_thetas(model.tensor_thetas)
    return float(np.mean(correct(tensor_only.predict(matrix)))), float(np.mean(correct(model.predict(matrix))))


def _mean_row(setting: list[object], scores: dict[str, list[float]], names: Sequence[str]) -> list[object]:
    return [*setting, *(round(float(np.mean(scores[name])), 4) for name in names)]


@dataclass(frozen=True)
class Scenario:
    """Sources with known accuracies for :func:`synthetic_experiment`."""

    accuracies: tuple[float, ...]
    cardinality: int
    class_balance: tuple[float, ...] | None = None


_SPREAD = (0.9, 0.8, 0.7, 0.75, 0.65)
_ONE_GOOD = (0.95, 0.6, 0.6, 0.6, 0.6)
SYNTHETIC_SCENARIOS = {
    "binary": Scenario(_SPREAD, 2),
    "binary, balance 0.3/0.7": Scenario(_SPREAD, 2, (0.3, 0.7)),
    "4 classes": Scenario(_SPREAD, 4),
    "4 classes, balance 0.1/0.2/0.3/0.4": Scenario(_SPREAD, 4, (0.1, 0.2, 0.3, 0.4)),
    "binary, one good source": Scenario(_ONE_GOOD, 2),
    "4 classes, one good source": Scenario(_ONE_GOOD, 4),
}
SYNTHETIC_COVERAGE = [0.9, 0.8, 1.0, 0.85, 0.95]


def synthetic_experiment(count: int, seed: int, scenarios: Sequence[str] | None = None) -> ReportTable:
    """Largest accuracy-estimation error and aggregate accuracy of every label model on :data:`SYNTHETIC_SCENARIOS`.

    Snorkel runs with 1000 steps. In the imbalanced scenarios it gets the true class
    balance as its prior, because it does not estimate one. Its default fit is timed in
    ``benchmarks/bench_aggregators.py``.
    """
    builders: dict[str, Callable[[], Aggregator]] = {
        "majority_vote": MajorityVote,
        "flyingsquid": FlyingSquid,
        "flyingsquid (symmetric)": lambda: FlyingSquid(multiclass="symmetric"),
        "dawid_skene": DawidSkene,
        "tensor": TensorDecomposition,
        "snorkel (1000 steps)": lambda: SnorkelLabelModel(n_epochs=1000),
    }
    rows = []
    for scenario in scenarios or list(SYNTHETIC_SCENARIOS):
        setting = SYNTHETIC_SCENARIOS[scenario]
        matrix, truth = simulate_label_matrix(
            count, setting.accuracies, setting.cardinality, class_balance=setting.class_balance, coverage=SYNTHETIC_COVERAGE, seed=seed
        )
        cells = []
        for name, build in builders.items():
            model = build()
            given = setting.class_balance if name.startswith("snorkel") else None
            model.fit(matrix, cardinality=setting.cardinality, class_balance=given)
            error = float(np.abs(model.accuracies - np.array(setting.accuracies)).max())
            cells.append(f"{error:.3f} / {np.mean(model.predict(matrix) == truth):.3f}")
        rows.append([scenario, *cells])
        logger.info("synthetic %s: %s", scenario, rows[-1])
    return ReportTable(
        f"synthetic sources, n = {count}, seed {seed}: largest |estimated - true accuracy| / aggregate accuracy",
        ["scenario", *builders],
        rows,
    )


def cardinality_experiment(
    cardinalities: Sequence[int], count: int, seeds: Sequence[int], thetas: Sequence[float] = (4.0, 0.5, 0.5)
) -> ReportTable:
    """Aggregate accuracy of each label model as the number of classes grows (discrete metric)."""
    builders: dict[str, Builder] = {
        "majority_vote": lambda distances: MajorityVote(),
        "flyingsquid": lambda distances: FlyingSquid(),
        "dawid_skene": lambda distances: DawidSkene(),
        "tensor (one-hot)": lambda distances: TensorDecomposition(),
        "pse": lambda distances: PseudoEuclidean(distances),
    }
    rows = []
    for cardinality in cardinalities:
        distances = discrete_metric(cardinality)
        scores: dict[str, list[float]] = {name: [] for name in ["best source", *builders]}
        for seed in seeds:
            matrix, truth = simulate_metric_sources(distances, thetas, count, seed=seed)
            scores["best source"].append(float(np.mean(matrix[:, 0] == truth)))
            for name, build in builders.items():
                scores[name].append(_accuracy(build(distances), matrix, cardinality, lambda labels, truth=truth: labels == truth))
        rows.append(_mean_row([cardinality], scores, list(scores)))
        logger.info("cardinality %d: %s", cardinality, rows[-1])
    return ReportTable(
        f"plain classification, theta = {tuple(thetas)}, n = {count}, {len(seeds)} seeds: accuracy",
        ["classes", "best source", *builders],
        rows,
    )


def tree_experiment(
    branch_lengths: Sequence[int], count: int, seeds: Sequence[int], thetas: Sequence[float] = (4.0, 0.5, 0.5)
) -> ReportTable:
    """Aggregate accuracy on a tree metric with three branches of b nodes, b growing."""
    builders: dict[str, Builder] = {
        "majority_vote": lambda distances: MajorityVote(),
        "tensor (one-hot)": lambda distances: TensorDecomposition(),
    }
    names = ["best source", *builders, *_PSE_COLUMNS]
    rows = []
    for branch_length in branch_lengths:
        distances = spider_metric(branch_length)
        cardinality = len(distances)
        scores: dict[str, list[float]] = {name: [] for name in names}
        for seed in seeds:
            matrix, truth = simulate_metric_sources(distances, thetas, count, seed=seed)

            def matches(labels: np.ndarray, truth: np.ndarray = truth) -> np.ndarray:
                return labels == truth

            scores["best source"].append(float(np.mean(matches(matrix[:, 0]))))
            for name, build in builders.items():
                scores[name].append(_accuracy(build(distances), matrix, cardinality, matches))
            for name, value in zip(_PSE_COLUMNS, _pse_accuracies(distances, matrix, matches), strict=True):
                scores[name].append(value)
        rows.append(_mean_row([branch_length, cardinality], scores, names))
        logger.info("tree b=%d: %s", branch_length, rows[-1])
    return ReportTable(
        f"tree with three branches of b nodes, theta = {tuple(thetas)}, n = {count}, {len(seeds)} seeds: accuracy",
        ["b", "nodes", *names],
        rows,
    )


def game24_experiment(puzzles: int, seeds: Sequence[int], thetas: Sequence[float] = (5.0, 0.6, 0.5)) -> ReportTable:
    """Accuracy of the aggregated game-of-24 expression (it makes 24), one row per seed and a mean row.

    Every seed draws new puzzles, true solutions and source outputs over the shared
    space of 3240 expression templates. The one-hot tensor method is left out: its
    third-moment tensor would have 3241^3 entries.
    """
    space = game24.expression_space()
    started = time.perf_counter()
    distances = game24.expression_distances(space)
    logger.info("game24: %d templates, distances in %.1f s", len(space), time.perf_counter() - started)
    names = ["source 1", "source 2", "source 3", "majority_vote", *_PSE_COLUMNS]
    scores: dict[str, list[float]] = {name: [] for name in names}
    rows: list[list[object]] = []
    for seed in seeds:
        numbers, solutions = game24.generate_puzzles(puzzles, seed=seed, space=space)
        truth = game24.pick_solutions(solutions, seed=seed)
        matrix, _ = simulate_metric_sources(distances, thetas, puzzles, seed=seed, truth=truth)

        def makes_24(labels: np.ndarray, solutions: np.ndarray = solutions) -> np.ndarray:
            return solutions[np.arange(len(labels)), labels]

        for source in range(3):
            scores[f"source {source + 1}"].append(float(np.mean(makes_24(matrix[:, source]))))
        scores["majority_vote"].append(_accuracy(MajorityVote(), matrix, len(space), makes_24))
        for name, value in zip(_PSE_COLUMNS, _pse_accuracies(distances, matrix, makes_24), strict=True):
            scores[name].append(value)
        rows.append([seed, *(round(scores[name][-1], 4) for name in names)])
        logger.info("game24 seed %d: %s", seed, rows[-1])
    rows.append(_mean_row(["mean"], scores, names))
    return ReportTable(
        f"game of 24, theta = {tuple(thetas)}, {puzzles} puzzles per seed: fraction of aggregated expressions that make 24",
        ["seed", *names],
        rows,
    )
