"""The game of 24 as a weak-supervision task with structured outputs.

A puzzle is four numbers from 1 to 13; a solution is an arithmetic expression that uses
each number once with + - * / and evaluates to 24. Expressions are represented as
templates over four slots ``a <= b <= c <= d`` (the puzzle's numbers in sorted
order), written in postfix (reverse Polish) notation with seven tokens, for example
``a b + c * d -`` for ((a + b) * c) - d. Templates that differ only by swapping the
operands of + or * are merged, which leaves 3240 templates. Every puzzle shares this
label space, so a label model can pool sources' behaviour over many puzzles.

The distance between two templates is the Levenshtein (edit) distance between their
token sequences, a metric with values 0 to 7.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from labhooks.aggregators import LabelMatrixError

SLOTS = ("a", "b", "c", "d")
OPERATORS = ("+", "-", "*", "/")
# The five binary-tree shapes with four leaves, as postfix patterns (x = number, o = operator).
_SHAPES = ("xxoxoxo", "xxoxxoo", "xxxooxo", "xxxoxoo", "xxxxooo")
_TARGET = 24.0
_TOLERANCE = 1e-9


def _canonical(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """Return the postfix tokens with the operands of + and * in a fixed order."""
    stack: list[tuple[str, ...]] = []
    for token in tokens:
        if token in OPERATORS:
            right = stack.pop()
            left = stack.pop()
            if token in "+*" and right < left:
                left, right = right, left
            stack.append((*left, *right, token))
        else:
            stack.append((token,))
    return stack[0]


@dataclass(frozen=True)
class ExpressionSpace:
    """The 3240 canonical expression templates of the game of 24, as postfix token tuples."""

    templates: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.templates)

    def render(self, index: int, numbers: tuple[int, ...] | np.ndarray) -> str:
        """Return template ``index`` as an infix expression over the puzzle's numbers (sorted)."""
        values = dict(zip(SLOTS, (str(int(number)) for number in sorted(numbers)), strict=True))
        stack: list[str] = []
        for token in self.templates[index]:
            if token in OPERATORS:
                right = stack.pop()
                left = stack.pop()
                stack.append(f"({left} {token} {right})")
            else:
                stack.append(values[token])
        return stack[0][1:-1]


@lru_cache(maxsize=1)
def expression_space() -> ExpressionSpace:
    """Return the label space of all canonical templates, in a fixed order."""
    seen: dict[tuple[str, ...], None] = {}
    for shape in _SHAPES:
        for order in itertools.permutations(SLOTS):
            for operators in itertools.product(OPERATORS, repeat=3):
                numbers = iter(order)
                symbols = iter(operators)
                tokens = tuple(next(numbers) if kind == "x" else next(symbols) for kind in shape)
                seen.setdefault(_canonical(tokens), None)
    return ExpressionSpace(tuple(sorted(seen)))


def expression_distances(space: ExpressionSpace | None = None, batch: int = 256) -> np.ndarray:
    """Return the (k, k) Levenshtein distances between the templates' token sequences.

    The dynamic programme runs on all pairs at once, in batches of rows.
    """
    space = space or expression_space()
    vocabulary = {token: code for code, token in enumerate((*SLOTS, *OPERATORS))}
    codes = np.array([[vocabulary[token] for token in template] for template in space.templates], dtype=np.int8)
    count, length = codes.shape
    result = np.empty((count, count), dtype=np.int8)
    for start in range(0, count, batch):
        first = codes[start : start + batch]
        # previous[j] is the distance between the first i tokens of `first` and the first j tokens of every template.
        previous = [np.full((first.shape[0], count), j, dtype=np.int8) for j in range(length + 1)]
        for i in range(1, length + 1):
            current = [np.full((first.shape[0], count), i, dtype=np.int8)]
            for j in range(1, length + 1):
                substitution = previous[j - 1] + (first[:, i - 1 : i] != codes[None, :, j - 1])
                current.append(np.minimum(np.minimum(previous[j] + 1, current[j - 1] + 1), substitution).astype(np.int8))
            previous = current
        result[start : start + batch] = previous[length]
    return result.astype(np.float64)


def evaluate_templates(numbers: np.ndarray, space: ExpressionSpace | None = None) -> np.ndarray:
    """Return the value of every template on every puzzle, shape (puzzles, k); NaN or inf after a division by zero."""
    space = space or expression_space()
    ordered = np.sort(np.atleast_2d(np.asarray(numbers, dtype=np.float64)), axis=1)
    slots = {slot: ordered[:, position] for position, slot in enumerate(SLOTS)}
    values = np.empty((ordered.shape[0], len(space)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, template in enumerate(space.templates):
            stack: list[np.ndarray] = []
            for token in template:
                if token in OPERATORS:
                    right = stack.pop()
                    left = stack.pop()
                    if token == "+":
                        stack.append(left + right)
                    elif token == "-":
                        stack.append(left - right)
                    elif token == "*":
                        stack.append(left * right)
                    else:
                        stack.append(left / right)
                else:
                    stack.append(slots[token])
            values[:, index] = stack[0]
    return values


def solves(values: np.ndarray) -> np.ndarray:
    """Return which template values equal 24 (within floating-point error)."""
    return np.abs(np.nan_to_num(values, nan=np.inf) - _TARGET) < _TOLERANCE


def solve(numbers: tuple[int, int, int, int] | list[int], space: ExpressionSpace | None = None) -> list[str]:
    """Return the distinct expressions that make 24 from the four numbers.

    Templates that differ only in the order of two equal numbers render to the same
    expression, which is listed once.
    """
    if len(numbers) != 4 or any(not 1 <= int(number) <= 13 for number in numbers):
        raise LabelMatrixError(f"a game-of-24 puzzle is four numbers from 1 to 13, got {list(numbers)}")
    space = space or expression_space()
    hits = np.flatnonzero(solves(evaluate_templates(np.array([numbers]), space))[0])
    return list(dict.fromkeys(space.render(int(index), tuple(numbers)) for index in hits))


def generate_puzzles(count: int, seed: int = 0, space: ExpressionSpace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` solvable puzzles; return (numbers (count, 4) sorted, solution mask (count, k)).

    Numbers are drawn uniformly from 1 to 13 with replacement, and draws without any
    solution are rejected.
    """
    space = space or expression_space()
    generator = np.random.default_rng(seed)
    puzzles: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    while sum(len(batch) for batch in puzzles) < count:
        candidates = np.sort(generator.integers(1, 14, size=(max(64, 2 * count), 4)), axis=1)
        mask = solves(evaluate_templates(candidates, space))
        solvable = mask.any(axis=1)
        puzzles.append(candidates[solvable])
        masks.append(mask[solvable])
    return np.concatenate(puzzles)[:count], np.concatenate(masks)[:count]


def pick_solutions(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Pick one solving template per puzzle uniformly at random: the true label a source aims at."""
    generator = np.random.default_rng(seed)
    scores = generator.random(masks.shape) * masks
    return scores.argmax(axis=1)
