"""The aggregator contract: label-matrix validation, tie-breaking, registry and bundle round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import labhooks
from labhooks.aggregators import (
    Aggregator,
    LabelMatrixError,
    NotFittedError,
    validate_class_balance,
    validate_distance_matrix,
    validate_label_matrix,
)
from labhooks.errors import BundleError, ConfigError, LabhooksError
from labhooks_ws.dawid_skene import DawidSkene
from labhooks_ws.majority import MajorityVote
from labhooks_ws.pseudo_euclidean import PseudoEuclidean
from labhooks_ws.simulate import simulate_label_matrix, simulate_metric_sources, spider_metric
from labhooks_ws.snorkel_model import SnorkelLabelModel
from labhooks_ws.tensor import TensorDecomposition
from labhooks_ws.triplet import FlyingSquid

CLASSES = [MajorityVote, SnorkelLabelModel, FlyingSquid, DawidSkene, TensorDecomposition]


@pytest.fixture(scope="module")
def small_matrix():
    return simulate_label_matrix(600, [0.85, 0.75, 0.7, 0.65], cardinality=3, coverage=[0.9, 0.8, 1.0, 0.7], seed=3)


@pytest.mark.parametrize(
    ("matrix", "cardinality", "message"),
    [
        (np.array([0, 1, 1]), None, "must be 2-D"),
        (np.zeros((2, 2, 2), dtype=int), None, "must be 2-D"),
        (np.zeros((0, 3), dtype=int), None, "is empty"),
        (np.array([[0, 1, 0.5]]), None, "non-integer value 0.5 at row 0, column 2"),
        (np.array([[0, 1, np.nan]]), None, "contains nan"),
        (np.array([["a", "b", "c"]]), None, "must contain integers"),
        (np.array([[0, -2, 1]]), None, "the label -2 at row 0, column 1"),
        (np.array([[0, 1, 3], [0, 4, 1]]), 3, "out of range for cardinality 3"),
        (np.full((4, 3), -1), None, "every entry of the label matrix is -1"),
    ],
)
def test_label_matrix_errors(matrix, cardinality, message):
    with pytest.raises(LabelMatrixError, match=message) as caught:
        validate_label_matrix(matrix, cardinality)
    assert isinstance(caught.value, LabhooksError)
    assert isinstance(caught.value, ValueError)


def test_label_matrix_out_of_range_names_fix():
    with pytest.raises(LabelMatrixError, match="pass cardinality=5"):
        validate_label_matrix(np.array([[0, 4, 1]]), 2)


def test_label_matrix_accepts_integral_floats():
    matrix = validate_label_matrix(np.array([[0.0, 1.0, -1.0]]))
    assert matrix.dtype.kind == "i"
    assert matrix.tolist() == [[0, 1, -1]]


@pytest.mark.parametrize("aggregator_class", [FlyingSquid, TensorDecomposition, SnorkelLabelModel])
def test_too_few_sources(aggregator_class):
    matrix = np.array([[0, 1], [1, 1], [0, 0]])
    with pytest.raises(LabelMatrixError, match=f"method '{aggregator_class.name}' needs at least 3 sources"):
        aggregator_class().fit(matrix)


def test_too_few_sources_for_pse():
    with pytest.raises(LabelMatrixError, match="needs at least 3 sources"):
        PseudoEuclidean(spider_metric(1)).fit(np.array([[0, 1], [1, 2]]))


def test_predict_with_other_source_count(small_matrix):
    matrix, _ = small_matrix
    model = DawidSkene().fit(matrix)
    with pytest.raises(LabelMatrixError, match="fitted on 4 sources, but the label matrix has 3 columns"):
        model.predict(matrix[:, :3])


@pytest.mark.parametrize(
    ("balance", "message"),
    [([0.5, 0.5], "has 2 entries but the cardinality is 3"), ([0.5, 0.6, -0.1], "only positive"), ([0.2, 0.2, 0.2], "sums to 0.6")],
)
def test_class_balance_errors(balance, message):
    with pytest.raises(LabelMatrixError, match=message):
        validate_class_balance(balance, 3)


def test_class_balance_normalised():
    assert validate_class_balance([0.2, 0.3, 0.5001], 3).sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("distances", "message"),
    [
        (np.zeros((2, 3)), "must be square"),
        (np.array([[0.0, 1.0], [2.0, 0.0]]), "not symmetric"),
        (np.array([[1.0, 1.0], [1.0, 0.0]]), "diagonal"),
        (np.array([[0.0, -1.0], [-1.0, 0.0]]), "negative value"),
        (np.array([[0.0, np.inf], [np.inf, 0.0]]), "NaN or infinite"),
    ],
)
def test_distance_matrix_errors(distances, message):
    with pytest.raises(LabelMatrixError, match=message):
        validate_distance_matrix(distances)


def test_pse_cardinality_must_match_distances():
    with pytest.raises(LabelMatrixError, match="differs from the 4 points"):
        PseudoEuclidean(spider_metric(1)).fit(np.array([[0, 1, 2]]), cardinality=5)


@pytest.mark.parametrize("aggregator_class", CLASSES)
def test_not_fitted(aggregator_class, tmp_path):
    model = aggregator_class()
    with pytest.raises(NotFittedError, match="not fitted"):
        model.predict(np.array([[0, 1, 1]]))
    with pytest.raises(NotFittedError):
        _ = model.accuracies
    with pytest.raises(NotFittedError):
        model.save(tmp_path / "model.safetensors")


def test_invalid_options():
    with pytest.raises(ConfigError, match="choose one of one_vs_rest, symmetric"):
        FlyingSquid(multiclass="pairwise")
    with pytest.raises(ConfigError, match="unknown option 'epochs'"):
        SnorkelLabelModel(epochs=3)
    assert DawidSkene(max_iter="5").options.max_iter == 5


def test_registry_lists_aggregators():
    registry = labhooks.get_registry()
    for name in ("majority_vote", "snorkel", "flyingsquid", "dawid_skene", "tensor", "pse"):
        aggregator = registry.aggregator(name)
        assert aggregator.name == name
        assert aggregator.plugin == "ws"
        assert issubclass(aggregator, Aggregator)
    assert registry.plugins["ws"].available


@pytest.mark.parametrize("aggregator_class", CLASSES)
def test_posteriors_are_distributions(aggregator_class, small_matrix):
    matrix, _ = small_matrix
    model = aggregator_class().fit(matrix)
    probabilities = model.predict_proba(matrix)
    assert probabilities.shape == (matrix.shape[0], 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities >= 0).all()
    assert model.accuracies.shape == (4,)
    assert model.class_balance.sum() == pytest.approx(1.0)
    labels = model.predict(matrix)
    assert labels.shape == (matrix.shape[0],)
    assert set(np.unique(labels)) <= {0, 1, 2}


@pytest.mark.parametrize("aggregator_class", CLASSES)
def test_bundle_round_trip(aggregator_class, small_matrix, tmp_path):
    matrix, _ = small_matrix
    model = aggregator_class(seed=5).fit(matrix)
    path = model.save(tmp_path / f"{aggregator_class.name}.safetensors")

    loaded = Aggregator.load(path)
    assert type(loaded) is aggregator_class
    assert loaded.options == model.options
    assert np.allclose(loaded.predict_proba(matrix), model.predict_proba(matrix), atol=1e-6)
    assert np.array_equal(loaded.predict(matrix), model.predict(matrix))
    assert np.allclose(loaded.accuracies, model.accuracies, equal_nan=True)
    assert np.allclose(loaded.class_balance, model.class_balance)

    manifest = labhooks.read_manifest(path)
    assert manifest["plugin"]["name"] == "ws"
    assert manifest["method"]["name"] == aggregator_class.name
    assert manifest["interventions"] == []


def test_pse_bundle_round_trip(tmp_path):
    distances = spider_metric(2)
    matrix, _ = simulate_metric_sources(distances, [3.0, 1.0, 0.7], 400, seed=1)
    model = PseudoEuclidean(distances).fit(matrix)
    loaded = PseudoEuclidean.load(model.save(tmp_path / "pse.safetensors"))
    assert np.array_equal(loaded.distances, distances)
    assert np.allclose(loaded.thetas, model.thetas)
    assert np.array_equal(loaded.predict(matrix), model.predict(matrix))
    assert np.allclose(loaded.predict_proba(matrix), model.predict_proba(matrix))


def test_load_with_wrong_class(small_matrix, tmp_path):
    matrix, _ = small_matrix
    path = MajorityVote().fit(matrix).save(tmp_path / "vote.safetensors")
    with pytest.raises(BundleError, match="contains the label model 'majority_vote', not 'dawid_skene'"):
        DawidSkene.load(path)


def test_load_bundle_with_interventions(tmp_path):
    vector = labhooks.SteeringVector("post_block[0]", torch.ones(4))
    path = labhooks.save_bundle(tmp_path / "vector.safetensors", [vector])
    with pytest.raises(BundleError, match="contains interventions, not a label model"):
        Aggregator.load(path)


def test_load_unknown_aggregator(tmp_path):
    path = labhooks.save_bundle(tmp_path / "other.safetensors", tensors={"x": torch.zeros(2)}, plugin="ws", method="no_such_model")
    with pytest.raises(BundleError, match="unknown aggregator 'no_such_model'"):
        Aggregator.load(path)


def test_tie_breaking_is_seeded_and_uniform():
    tied = np.array([[0, 1, -1]] * 2000)
    first = MajorityVote(seed=1).fit(tied).predict(tied)
    again = MajorityVote(seed=1).fit(tied).predict(tied)
    other = MajorityVote(seed=2).fit(tied).predict(tied)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert 0.45 < first.mean() < 0.55


def test_tie_break_abstain():
    matrix = np.array([[0, 1, -1], [1, 1, 0], [-1, -1, -1]])
    model = MajorityVote().fit(matrix, class_balance=[0.5, 0.5])
    assert model.predict(matrix, tie_break="abstain").tolist() == [-1, 1, -1]
    with pytest.raises(ConfigError, match="invalid tie_break"):
        model.predict(matrix, tie_break="first")


def test_majority_vote_shares():
    matrix = np.array([[0, 0, 1], [2, -1, -1], [-1, -1, -1]])
    model = MajorityVote().fit(matrix, cardinality=3, class_balance=[0.2, 0.3, 0.5])
    probabilities = model.predict_proba(matrix)
    assert np.allclose(probabilities[0], [2 / 3, 1 / 3, 0])
    assert np.allclose(probabilities[1], [0, 0, 1])
    assert np.allclose(probabilities[2], [0.2, 0.3, 0.5])


@pytest.mark.parametrize("aggregator_class", [MajorityVote, FlyingSquid, DawidSkene])
def test_silent_source_accuracy_is_nan(aggregator_class):
    matrix, _ = simulate_label_matrix(500, [0.8, 0.8, 0.8, 0.8], seed=0)
    matrix[:, 3] = -1
    accuracies = aggregator_class().fit(matrix).accuracies
    assert np.isnan(accuracies[3])
    assert np.isfinite(accuracies[:3]).all()


def test_load_rejects_wrong_tensor_shape(small_matrix, tmp_path):
    matrix, _ = small_matrix
    model = DawidSkene().fit(matrix)
    tensors = {key: torch.from_numpy(value) for key, value in model.state().items()}
    tensors["confusion"] = tensors["confusion"][:, :2, :]
    path = labhooks.save_bundle(tmp_path / "broken.safetensors", tensors=tensors, plugin="ws", method="dawid_skene", config=model.config())
    with pytest.raises(BundleError, match=r"confusion of shape \[4, 2, 3\], expected \[4, 3, 3\]"):
        Aggregator.load(path)


def test_load_rejects_missing_tensor(small_matrix, tmp_path):
    matrix, _ = small_matrix
    model = TensorDecomposition().fit(matrix)
    tensors = {key: torch.from_numpy(value) for key, value in model.state().items() if key != "tables"}
    path = labhooks.save_bundle(tmp_path / "partial.safetensors", tensors=tensors, plugin="ws", method="tensor", config=model.config())
    with pytest.raises(BundleError, match="missing the tensor 'tables'"):
        Aggregator.load(path)
