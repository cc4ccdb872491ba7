"""Label models on synthetic sources with known accuracies: estimated accuracies, class balance, aggregate accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from labhooks_ws.dawid_skene import DawidSkene
from labhooks_ws.majority import MajorityVote
from labhooks_ws.pseudo_euclidean import PseudoEuclidean
from labhooks_ws.simulate import (
    discrete_metric,
    metric_source_accuracies,
    simulate_label_matrix,
    simulate_metric_sources,
    spider_metric,
)
from labhooks_ws.snorkel_model import SnorkelLabelModel
from labhooks_ws.tensor import TensorDecomposition
from labhooks_ws.triplet import FlyingSquid, _signed_votes, fit_binary, triplet_magnitudes
from labhooks_ws.votes import distinct_rows

ACCURACIES = [0.9, 0.8, 0.7, 0.75, 0.65]
COVERAGE = [0.9, 0.8, 1.0, 0.85, 0.95]

# Label models whose assumptions hold for uniform errors and independent abstains. The
# symmetric FlyingSquid variant is the one whose model matches uniform multiclass errors;
# Snorkel's default 100 steps leave its estimates off by up to 0.18 with few sources.
MODEL_BASED = [
    (FlyingSquid, {"multiclass": "symmetric"}),
    (DawidSkene, {}),
    (TensorDecomposition, {}),
    (SnorkelLabelModel, {"n_epochs": 1000}),
]


def _ids(cases):
    return [f"{cls.name}{'-' + '-'.join(f'{k}={v}' for k, v in options.items()) if options else ''}" for cls, options in cases]


def _check_recovery(count, cardinality, class_balance, tolerance, seed):
    matrix, _ = simulate_label_matrix(count, ACCURACIES, cardinality, coverage=COVERAGE, class_balance=class_balance, seed=seed)
    truth_balance = np.asarray(class_balance) if class_balance is not None else np.full(cardinality, 1.0 / cardinality)
    for aggregator_class, options in MODEL_BASED:
        # Snorkel takes the class balance as a prior instead of estimating it.
        given = class_balance if aggregator_class is SnorkelLabelModel else None
        model = aggregator_class(**options).fit(matrix, cardinality=cardinality, class_balance=given)
        error = np.abs(model.accuracies - ACCURACIES).max()
        assert error < tolerance, f"{aggregator_class.name}: accuracies {np.round(model.accuracies, 3)} vs {ACCURACIES}"
        balance_error = np.abs(model.class_balance - truth_balance).max()
        assert balance_error < max(tolerance, 0.03), f"{aggregator_class.name}: class balance {np.round(model.class_balance, 3)}"


@pytest.mark.parametrize(("cardinality", "class_balance"), [(2, None), (2, [0.3, 0.7]), (4, None), (4, [0.1, 0.2, 0.3, 0.4])])
def test_accuracies_recovered_small(cardinality, class_balance):
    _check_recovery(3000, cardinality, class_balance, tolerance=0.04, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize(("cardinality", "class_balance"), [(2, None), (2, [0.3, 0.7]), (4, None), (4, [0.1, 0.2, 0.3, 0.4])])
def test_accuracies_within_002_at_10000(cardinality, class_balance):
    _check_recovery(10_000, cardinality, class_balance, tolerance=0.02, seed=1)


@pytest.mark.parametrize("cardinality", [2, 4])
@pytest.mark.parametrize(("aggregator_class", "options"), [*MODEL_BASED, (FlyingSquid, {})], ids=_ids([*MODEL_BASED, (FlyingSquid, {})]))
def test_one_good_source_beats_majority_vote(aggregator_class, options, cardinality):
    matrix, truth = simulate_label_matrix(3000, [0.95, 0.6, 0.6, 0.6, 0.6], cardinality, seed=0)
    vote = np.mean(MajorityVote().fit(matrix).predict(matrix) == truth)
    model = np.mean(aggregator_class(**options).fit(matrix).predict(matrix) == truth)
    assert model > vote + 0.03, f"{aggregator_class.name}: {model:.3f} vs majority vote {vote:.3f}"


def test_triplet_exact_on_population_moments():
    correlations = np.array([0.8, 0.5, 0.3, 0.6])
    moments = np.outer(correlations, correlations)
    np.fill_diagonal(moments, 1.0)
    assert np.allclose(triplet_magnitudes(moments, 1e-4), correlations)


def test_distinct_rows_counts():
    matrix, _ = simulate_label_matrix(500, [0.8, 0.7, 0.6], 3, coverage=[0.9, 0.8, 0.7], seed=1)
    rows, counts = distinct_rows(matrix, 3)
    unique, unique_counts = np.unique(matrix, axis=0, return_counts=True)
    expected = {tuple(row): count for row, count in zip(unique.tolist(), unique_counts.tolist(), strict=True)}
    assert {tuple(row): count for row, count in zip(rows.tolist(), counts.tolist(), strict=True)} == expected
    assert distinct_rows(matrix, 3, max_codes=10) is None


def test_triplet_on_distinct_rows_matches_full():
    matrix, _ = simulate_label_matrix(3000, ACCURACIES, 2, coverage=COVERAGE, seed=3)
    rows, counts = distinct_rows(matrix, 2)
    full = fit_binary(_signed_votes(matrix, 1, 2), 1e-4, None)
    compressed = fit_binary(_signed_votes(rows, 1, 2), 1e-4, None, counts)
    assert np.allclose(full[0], compressed[0])
    assert full[1] == pytest.approx(compressed[1])
    assert np.allclose(full[2], compressed[2])


def test_flyingsquid_one_vs_rest_binary_identity():
    matrix, _ = simulate_label_matrix(4000, ACCURACIES, 2, seed=4)
    default = FlyingSquid().fit(matrix)
    symmetric = FlyingSquid(multiclass="symmetric").fit(matrix)
    assert np.allclose(default.accuracies, symmetric.accuracies)
    assert np.allclose(default.predict_proba(matrix), symmetric.predict_proba(matrix))


def test_flyingsquid_one_vs_rest_multiclass():
    matrix, truth = simulate_label_matrix(4000, ACCURACIES, 3, coverage=COVERAGE, seed=2)
    model = FlyingSquid().fit(matrix)
    # One-versus-rest treats each class's errors as symmetric, which uniform errors over
    # three classes are not, so its accuracies are only close.
    assert np.abs(model.accuracies - ACCURACIES).max() < 0.06
    assert np.mean(model.predict(matrix) == truth) >= np.mean(MajorityVote().fit(matrix).predict(matrix) == truth)


def test_snorkel_seeded():
    matrix, _ = simulate_label_matrix(1000, ACCURACIES, 3, seed=5)
    first = SnorkelLabelModel(seed=7).fit(matrix).predict_proba(matrix)
    second = SnorkelLabelModel(seed=7).fit(matrix).predict_proba(matrix)
    assert np.array_equal(first, second)


def test_dawid_skene_given_balance_is_kept():
    matrix, _ = simulate_label_matrix(2000, ACCURACIES, 3, seed=6)
    model = DawidSkene().fit(matrix, class_balance=[0.2, 0.3, 0.5])
    assert np.allclose(model.class_balance, [0.2, 0.3, 0.5])


def test_tensor_recovers_conditional_tables():
    matrix, _ = simulate_label_matrix(20_000, [0.9, 0.7, 0.8], 3, coverage=[0.8, 1.0, 0.9], seed=8)
    tables = TensorDecomposition().fit(matrix).conditional_tables
    # Source 0 abstains with probability 0.2 and otherwise is right with probability 0.9.
    assert np.allclose(tables[0, 3], 0.2, atol=0.02)
    assert np.allclose(np.diagonal(tables[0, :3]), 0.8 * 0.9, atol=0.03)


@pytest.mark.parametrize(("distances", "thetas"), [(spider_metric(3), [4.0, 0.5, 0.5]), (discrete_metric(5), [3.0, 1.0, 1.5])])
def test_pse_accuracies_small(distances, thetas):
    matrix, _ = simulate_metric_sources(distances, thetas, 2000, seed=0)
    model = PseudoEuclidean(distances).fit(matrix)
    expected = metric_source_accuracies(distances, thetas)
    assert np.abs(model.accuracies - expected).max() < 0.04


@pytest.mark.slow
@pytest.mark.parametrize(
    ("distances", "thetas"),
    [(spider_metric(3), [4.0, 0.5, 0.5]), (spider_metric(10), [4.0, 0.5, 0.5]), (discrete_metric(5), [3.0, 1.0, 1.5])],
)
def test_pse_accuracies_within_002_at_10000(distances, thetas):
    matrix, _ = simulate_metric_sources(distances, thetas, 10_000, seed=1)
    model = PseudoEuclidean(distances).fit(matrix)
    expected = metric_source_accuracies(distances, thetas)
    assert np.abs(model.accuracies - expected).max() < 0.02


def test_pse_without_refinement_keeps_tensor_estimate():
    distances = spider_metric(2)
    matrix, _ = simulate_metric_sources(distances, [3.0, 1.0, 0.7], 3000, seed=2)
    model = PseudoEuclidean(distances, refine=False).fit(matrix)
    assert np.array_equal(model.thetas, model.tensor_thetas)
    # The tensor step alone orders the sources correctly.
    assert np.argmax(model.thetas) == 0
    assert model.thetas[1] > model.thetas[2]


def test_pse_estimated_class_balance():
    distances = discrete_metric(3)
    balance = [0.6, 0.3, 0.1]
    matrix, _ = simulate_metric_sources(distances, [2.5, 2.0, 1.5, 2.0], 6000, class_balance=balance, seed=3)
    model = PseudoEuclidean(distances, estimate_class_balance=True).fit(matrix)
    assert np.allclose(model.class_balance, balance, atol=0.03)
