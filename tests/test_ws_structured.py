"""Structured outputs: pseudo-Euclidean embeddings, tree metrics, the game of 24 and the reproductions."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from labhooks.aggregators import LabelMatrixError
from labhooks_ws import game24
from labhooks_ws.pseudo_euclidean import PseudoEuclidean, PseudoEuclideanEmbedding
from labhooks_ws.reproductions import cardinality_experiment, game24_experiment, tree_experiment
from labhooks_ws.simulate import discrete_metric, simulate_metric_sources, spider_metric


def _levenshtein(first, second):
    previous = list(range(len(second) + 1))
    for i, token in enumerate(first, start=1):
        current = [i]
        for j, other in enumerate(second, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other)))
        previous = current
    return previous[-1]


def _evaluate(expression):
    """Evaluate an infix expression of integers, + - * / and brackets with exact fractions."""
    tokens = expression.replace("(", " ( ").replace(")", " ) ").split()
    position = 0

    def parse_sum():
        nonlocal position
        value = parse_product()
        while position < len(tokens) and tokens[position] in "+-":
            operator = tokens[position]
            position += 1
            right = parse_product()
            value = value + right if operator == "+" else value - right
        return value

    def parse_product():
        nonlocal position
        value = parse_atom()
        while position < len(tokens) and tokens[position] in "*/":
            operator = tokens[position]
            position += 1
            right = parse_atom()
            value = value * right if operator == "*" else value / right
        return value

    def parse_atom():
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            value = parse_sum()
            position += 1
            return value
        return Fraction(int(token))

    return parse_sum()


def test_spider_metric_distances():
    distances = spider_metric(2)
    assert distances.shape == (7, 7)
    # Node 1 and 2 are depths 1 and 2 of branch 0; node 3 is depth 1 of branch 1.
    assert distances[0, 2] == 2
    assert distances[1, 2] == 1
    assert distances[2, 3] == 3
    assert np.array_equal(distances, distances.T)


@pytest.mark.parametrize(
    "distances",
    [spider_metric(3), discrete_metric(6), np.abs(np.subtract.outer(np.arange(6.0), np.arange(6.0)))],
    ids=["spider", "discrete", "line"],
)
def test_embedding_is_isometric(distances):
    embedding = PseudoEuclideanEmbedding.from_distances(distances)
    coordinates = embedding.coordinates
    squared = embedding.squared_distance(coordinates[:, None, :], coordinates[None, :, :])
    assert np.allclose(squared, distances**2, atol=1e-9)
    assert not embedding.truncated


def test_tree_metric_needs_negative_part():
    embedding = PseudoEuclideanEmbedding.from_distances(spider_metric(3))
    assert embedding.negative.shape[1] >= 1
    line = PseudoEuclideanEmbedding.from_distances(np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0))))
    assert line.negative.shape[1] == 0
    assert line.positive.shape[1] == 1


def test_pse_predict_snaps_weighted_mean():
    distances = spider_metric(3)
    matrix, _ = simulate_metric_sources(distances, [3.0, 1.0, 0.6], 300, seed=4)
    model = PseudoEuclidean(distances).fit(matrix)
    embedding = PseudoEuclideanEmbedding.from_distances(distances)
    coordinates = embedding.coordinates
    weights = model.thetas / model.thetas.sum()
    mean = np.einsum("a,nad->nd", weights, coordinates[matrix])
    nearest = embedding.squared_distance(mean[:, None, :], coordinates[None, :, :]).argmin(axis=1)
    assert np.array_equal(model.predict(matrix), nearest)


def test_pse_rows_without_votes():
    distances = spider_metric(1)
    matrix = np.array([[0, 0, 1], [2, 2, 2], [-1, -1, -1]])
    model = PseudoEuclidean(distances).fit(matrix, class_balance=[0.1, 0.2, 0.6, 0.1])
    assert model.predict(matrix)[2] == 2


def test_expression_space_size_and_rendering():
    space = game24.expression_space()
    assert len(space) == 3240
    assert all(len(template) == 7 for template in space.templates)
    index = space.templates.index(game24._canonical(("a", "b", "+", "c", "*", "d", "-")))
    assert space.render(index, (4, 1, 3, 2)) == "((1 + 2) * 3) - 4"


def test_solver_finds_valid_expressions():
    solutions = game24.solve([4, 7, 8, 8])
    assert solutions
    assert len(solutions) == len(set(solutions))
    for expression in solutions:
        assert _evaluate(expression) == 24
    assert "(8 / (3 - (8 / 3)))" in [f"({expression})" for expression in game24.solve([3, 3, 8, 8])]


def test_solver_reports_unsolvable():
    assert game24.solve([1, 1, 1, 1]) == []
    with pytest.raises(LabelMatrixError, match="four numbers from 1 to 13"):
        game24.solve([0, 1, 2, 3])


def test_generated_puzzles_are_solvable():
    numbers, solutions = game24.generate_puzzles(20, seed=1)
    assert numbers.shape == (20, 4)
    assert numbers.min() >= 1 and numbers.max() <= 13
    assert solutions.any(axis=1).all()
    truth = game24.pick_solutions(solutions, seed=1)
    assert solutions[np.arange(20), truth].all()
    space = game24.expression_space()
    for row, index in zip(numbers[:5], truth[:5], strict=True):
        assert _evaluate(space.render(int(index), row)) == 24


def test_expression_distances_are_levenshtein():
    space = game24.ExpressionSpace(game24.expression_space().templates[:300])
    distances = game24.expression_distances(space, batch=64)
    generator = np.random.default_rng(0)
    for i, j in generator.integers(0, 300, size=(40, 2)):
        assert distances[i, j] == _levenshtein(space.templates[i], space.templates[j])
    assert np.array_equal(distances, distances.T)
    assert (np.diagonal(distances) == 0).all()
    sample = generator.choice(300, size=25, replace=False)
    for i, j, k in itertools.permutations(sample[:8], 3):
        assert distances[i, k] <= distances[i, j] + distances[j, k]


def test_cardinality_reproduction_small():
    table = cardinality_experiment([3], 2000, [0])
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["tensor (one-hot)"] > row["majority_vote"] + 0.1
    assert row["tensor (one-hot)"] >= row["flyingsquid"] - 0.03
    assert row["pse"] >= row["majority_vote"]


def test_tree_reproduction_small():
    table = tree_experiment([5], 1000, [0])
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["nodes"] == 16
    assert row["pse (tensor + likelihood)"] > row["majority_vote"] + 0.15
    assert row["pse (tensor + likelihood)"] > row["tensor (one-hot)"]


@pytest.mark.slow
def test_game24_reproduction():
    table = game24_experiment(150, [0])
    row = dict(zip(table.columns, table.rows[-1], strict=True))
    assert row["pse (tensor + likelihood)"] > row["majority_vote"] + 0.2
    assert row["pse (tensor + likelihood)"] >= row["source 1"] - 0.02
