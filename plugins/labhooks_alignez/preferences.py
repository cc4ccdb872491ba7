"""Self-generated preference data: the model writes both sides of every preference pair.

For each query and axis the model first describes the characteristics of an answer of
each keyword (a helpful and a useless one, say), then writes one response conditioned on
each description. The response written for the preferred keyword is the preferred side of
the pair. Both steps sample with a seed, in batches, through the chat template when the
tokenizer has one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from labhooks.generation import format_prompt, generate_texts
from labhooks.progress import Progress
from labhooks_alignez.config import Axis

logger = logging.getLogger(__name__)

CHARACTERISTICS_PROMPT = (
    "List the characteristics of a {keyword} answer to the question below. "
    "Describe the characteristics only; do not answer the question.\n\nQuestion: {query}"
)
RESPONSE_INSTRUCTION = "You write {keyword} answers. A {keyword} answer has these characteristics:\n{characteristics}"
# The response step samples with its own seeds, so its batches do not reuse the sampling
# streams of the characteristics step.
RESPONSE_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one query: the one written as preferred and the one written as dispreferred."""

    axis: str
    query: str
    preferred: str
    dispreferred: str


def query_and_response(tokenizer: object, query: str, response: str) -> str:
    """Return the text whose last-token state represents a response: the query's chat prompt, then the response."""
    if getattr(tokenizer, "chat_template", None):
        return format_prompt(tokenizer, query) + response
    return f"{query}\n{response}"


def response_prompt(tokenizer: object, query: str, keyword: str, characteristics: str) -> str:
    """Return the full prompt text that asks for a response with the given characteristics."""
    instruction = RESPONSE_INSTRUCTION.format(keyword=keyword, characteristics=characteristics.strip() or "(none given)")
    if getattr(tokenizer, "chat_template", None):
        return format_prompt(tokenizer, query, system=instruction)
    return f"{instruction}\n\nQuestion: {query}\nAnswer:"


def generate_pairs(
    model: nn.Module,
    tokenizer: object,
    queries: list[str],
    axis: Axis,
    *,
    characteristics_tokens: int,
    response_tokens: int,
    batch_size: int,
    seed: int,
    progress: Progress,
) -> list[PreferencePair]:
    """Generate one preference pair per query on one axis; a pair with an empty side is dropped."""
    keywords = (axis.preferred, axis.dispreferred)
    requests = [CHARACTERISTICS_PROMPT.format(keyword=keyword, query=query) for query in queries for keyword in keywords]
    characteristics = generate_texts(
        model,
        tokenizer,
        requests,
        max_new_tokens=characteristics_tokens,
        batch_size=batch_size,
        do_sample=True,
        seed=seed,
        progress=progress,
        description=f"{axis.name}: characteristics",
    )

    prompts = []
    for index, query in enumerate(queries):
        for side, keyword in enumerate(keywords):
            prompts.append(response_prompt(tokenizer, query, keyword, characteristics[2 * index + side]))
    # The prompts are formatted already, so generate_texts must not apply the template again.
    responses = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=response_tokens,
        batch_size=batch_size,
        do_sample=True,
        seed=seed + RESPONSE_SEED_OFFSET,
        chat=False,
        progress=progress,
        description=f"{axis.name}: responses",
    )

    pairs = []
    for index, query in enumerate(queries):
        preferred, dispreferred = responses[2 * index], responses[2 * index + 1]
        if preferred and dispreferred:
            pairs.append(PreferencePair(axis.name, query, preferred, dispreferred))
    if len(pairs) < len(queries):
        logger.warning("axis %s: dropped %d of %d pairs with an empty response", axis.name, len(queries) - len(pairs), len(queries))
    return pairs
