"""A seeded generator of ListOps-style expressions whose values are single digits.

An expression nests the operators MAX, MIN, MED (the median; the lower middle value when
the count is even) and SM (sum modulo 10) over digits, e.g. ``[MAX 3 [SM 4 9] 1]``,
whose value is 3. The same seed always gives the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from labhooks.training import Example

OPERATORS = ("MAX", "MIN", "MED", "SM")
PROMPT = "Evaluate the ListOps expression. MAX, MIN, MED (median) and SM (sum mod 10) act on digits. Answer with one digit.\n"


def apply_operator(operator: str, values: Sequence[int]) -> int:
    """Return the value of one operator over its evaluated arguments."""
    if operator == "MAX":
        return max(values)
    if operator == "MIN":
        return min(values)
    if operator == "MED":
        ordered = sorted(values)
        return ordered[(len(ordered) - 1) // 2]
    if operator == "SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {operator!r}; choose one of {', '.join(OPERATORS)}")


def _expression(rng: random.Random, depth: int, max_arguments: int) -> tuple[str, int]:
    operator = rng.choice(OPERATORS)
    count = rng.randint(2, max_arguments)
    parts, values = [], []
    for _ in range(count):
        if depth > 1 and rng.random() < 0.35:
            text, value = _expression(rng, depth - 1, max_arguments)
        else:
            value = rng.randint(0, 9)
            text = str(value)
        parts.append(text)
        values.append(value)
    return f"[{operator} {' '.join(parts)}]", apply_operator(operator, values)


def evaluate_expression(text: str) -> int:
    """Evaluate an expression string such as ``[MAX 3 [SM 4 9] 1]``."""
    tokens = text.replace("[", " [ ").replace("]", " ] ").split()
    stack: list[list[object]] = []
    result: int | None = None
    for token in tokens:
        if token == "[":
            stack.append([])
        elif token == "]":
            operator, *arguments = stack.pop()
            value = apply_operator(str(operator), [int(argument) for argument in arguments])  # type: ignore[call-overload]
            if stack:
                stack[-1].append(value)
            else:
                result = value
        elif stack:
            stack[-1].append(token if token in OPERATORS else int(token))
        else:
            raise ValueError(f"invalid ListOps expression {text!r}: a digit or operator is outside brackets")
    if result is None or stack:
        raise ValueError(f"invalid ListOps expression {text!r}: unbalanced brackets")
    return result


def generate_listops(count: int, seed: int = 0, max_depth: int = 2, max_arguments: int = 4, instruction: str = PROMPT) -> list[Example]:
    """Return ``count`` seeded examples: the prompt is the instruction and the expression, the completion its digit."""
    if count < 1 or max_depth < 1 or max_arguments < 2:
        raise ValueError(f"need count >= 1, max_depth >= 1 and max_arguments >= 2, got {count}, {max_depth}, {max_arguments}")
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        text, value = _expression(rng, max_depth, max_arguments)
        examples.append(Example(instruction + text, str(value)))
    return examples
