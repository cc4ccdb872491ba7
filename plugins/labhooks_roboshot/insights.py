"""Insight pairs: where RoboShot's directions come from.

An insight pair is two short texts that differ in one concept, for example
``background: a bird on water; a bird on land``. A *harmful* pair differs in a spurious
concept (one that does not decide the class); a *helpful* pair differs in what does decide
it. Pairs come from a language model prompted with the task description, or from a file
the user writes.

Language model outputs and file lines share one format, parsed by :func:`parse_insights`::

    <concept>: <text for the first side>; <text for the second side>

File formats (:func:`read_insights_file`):

* ``.txt``: a ``[harmful]`` line, then one pair per line, then ``[helpful]`` and its pairs;
  ``#`` starts a comment.
* ``.json``: ``{"harmful": [...], "helpful": [...]}`` where each item is a line in the
  format above or an object ``{"concept": ..., "texts": [first, second]}``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhooks.errors import ConfigError, LabhooksError
from labhooks.generation import generate_texts
from labhooks.models import LoadedModel
from labhooks.progress import Progress

logger = logging.getLogger(__name__)

KINDS = ("harmful", "helpful")

# Few-shot examples of the prompts. They come from other tasks (bird photos, news
# topics), so a copied example is recognisable and dropped instead of becoming an insight
# of this task. Each is (task, first class, second class, example lines).
_EXAMPLE_TASKS = {
    "harmful": (
        (
            "classify photos of birds as waterbird or landbird",
            "background: a photo of a bird on water; a photo of a bird on land",
            "lighting: a bright sunny photo; a dark cloudy photo",
        ),
        (
            "classify news articles as sport or politics",
            "source: an article from a British newspaper; an article from an American newspaper",
            "date: an article from last year; an article from this week",
        ),
    ),
    "helpful": (
        (
            "classify photos of birds as waterbird or landbird",
            "beak: a bird with a flat, wide beak; a bird with a short, pointed beak",
            "feet: a bird with webbed feet; a bird with clawed feet",
        ),
        (
            "classify news articles as sport or politics",
            "people: an article about athletes; an article about politicians",
            "events: an article about a match; an article about an election",
        ),
    ),
}
_EXAMPLE_CLASSES = {
    "classify photos of birds as waterbird or landbird": ("waterbird", "landbird"),
    "classify news articles as sport or politics": ("sport", "politics"),
}

_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|\(?[a-z][.)])\s+", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"[<>\[\]{}]|\btext for\b|\bclass [ab]\b", re.IGNORECASE)
_MAX_TEXT_LENGTH = 200


class InsightError(LabhooksError):
    """No usable insight pair could be obtained from the language model or the file."""


@dataclass(frozen=True)
class InsightPair:
    """Two texts that differ in one concept; ``kind`` is "harmful" (spurious) or "helpful"."""

    kind: str
    concept: str
    first: str
    second: str

    def as_line(self) -> str:
        return f"{self.concept}: {self.first}; {self.second}"


def _clean(text: str) -> str:
    text = text.replace("**", "").replace("__", "").strip()
    return text.strip(" \t\"'`").rstrip(".").strip()


def parse_insight_line(line: str, kind: str) -> InsightPair | None:
    """Parse one ``<concept>: <first>; <second>`` line, or return None when it is not one.

    Tolerates list markers (``1.``, ``-``, ``*``), markdown emphasis, quotes, a trailing
    period, and ``|`` or `` vs `` in place of the semicolon. Rejects placeholders copied
    from the prompt, identical sides and overlong texts.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    body = _LIST_MARKER.sub("", line.strip().replace("**", ""), count=1)
    concept, separator, rest = body.partition(":")
    if not separator:
        return None
    for divider in (";", "|", " vs. ", " vs "):
        if divider in rest:
            # A model that keeps listing ("a; b; a; b") gives its first two texts.
            first, second = rest.split(divider)[:2]
            break
    else:
        return None
    concept, first, second = _clean(concept), _clean(first), _clean(second)
    if not concept or not first or not second or len(concept) > 60:
        return None
    if first.lower() == second.lower() or max(len(first), len(second)) > _MAX_TEXT_LENGTH:
        return None
    if any(_PLACEHOLDER.search(text) for text in (concept, first, second)):
        return None
    return InsightPair(kind, concept, first, second)


def parse_insights(text: str, kind: str) -> list[InsightPair]:
    """Parse the insight lines of a language model answer, dropping copies and the prompt's examples.

    Parsing stops at the first blank line or ``Task:`` line, where a model that continues
    the few-shot pattern starts a task of its own.
    """
    examples = {_example_key(line) for _, *lines in _EXAMPLE_TASKS[kind] for line in lines}
    seen = set()
    pairs = []
    for line in text.splitlines():
        if not line.strip() or line.strip().lower().startswith("task:"):
            if pairs:
                break
            continue
        pair = parse_insight_line(line, kind)
        if pair is None:
            continue
        key = (pair.first.lower(), pair.second.lower())
        if key in seen or key in examples:
            continue
        seen.add(key)
        pairs.append(pair)
    return pairs


def _example_key(line: str) -> tuple[str, str]:
    pair = parse_insight_line(line, "helpful")
    assert pair is not None
    return pair.first.lower(), pair.second.lower()


def _heading(kind: str, first_class: str, second_class: str) -> str:
    if kind == "harmful":
        return "Features that do not decide the class:"
    return f"Differences between {first_class} and {second_class}:"


def insight_prompt(kind: str, task: str, first_class: str, second_class: str) -> str:
    """Return the few-shot completion prompt that requests insight pairs of one kind.

    Two worked tasks show the ``<concept>: <first>; <second>`` format, then the prompt
    ends with this task's heading, so the model's continuation is the list. Completion
    prompts suit small instruction models better than a chat request, which they tend to
    answer in free prose.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    blocks = []
    for example_task, *lines in _EXAMPLE_TASKS[kind]:
        first, second = _EXAMPLE_CLASSES[example_task]
        blocks.append(f"Task: {example_task}.\n{_heading(kind, first, second)}\n" + "\n".join(lines))
    task_line = task.strip().rstrip(".")
    blocks.append(f"Task: {task_line}.\n{_heading(kind, first_class, second_class)}\n")
    return "\n\n".join(blocks)


def generate_insights(
    loaded: LoadedModel,
    task: str,
    classes: Sequence[str],
    *,
    kinds: Iterable[str] = KINDS,
    count: int = 3,
    attempts: int = 3,
    max_new_tokens: int = 64,
    max_class_pairs: int = 6,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[InsightPair]:
    """Ask a language model for insight pairs, retrying prompts whose answers do not parse.

    One harmful prompt per task, because spurious features concern no class in particular,
    and one helpful prompt per pair of classes (at most ``max_class_pairs`` pairs). At most
    ``count`` pairs are kept from each output. The first attempt is greedy; each retry samples with
    a new seed. Raises :class:`InsightError` when a kind gets no usable pair after
    ``attempts`` tries.
    """
    if not task.strip():
        raise ConfigError("task= is empty: describe the classification task in one sentence for the language model")
    if attempts < 1:
        raise ConfigError(f"attempts must be >= 1, got {attempts}")
    if len(classes) < 2:
        raise ConfigError(f"insights need at least two classes, got {list(classes)}")
    class_pairs = [(a, b) for index, a in enumerate(classes) for b in classes[index + 1 :]][:max_class_pairs]
    requests = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        requests += [(kind, *class_pairs[0])] if kind == "harmful" else [(kind, a, b) for a, b in class_pairs]
    found: dict[tuple[str, str, str], list[InsightPair]] = {request: [] for request in requests}
    last_answers: dict[str, str] = {}

    for attempt in range(attempts):
        pending = [request for request in requests if not found[request]]
        if not pending:
            break
        if attempt:
            logger.info("retrying %d insight prompts whose answers did not parse (attempt %d of %d)", len(pending), attempt + 1, attempts)
        prompts = [insight_prompt(kind, task, a, b) for kind, a, b in pending]
        answers = generate_texts(
            loaded.model,
            loaded.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            do_sample=attempt > 0,
            seed=seed + attempt,
            chat=False,
            progress=progress,
            description=f"insights (attempt {attempt + 1})",
        )
        for request, answer in zip(pending, answers, strict=True):
            found[request] = parse_insights(answer, request[0])[:count]
            last_answers[request[0]] = answer
            if not found[request]:
                logger.info("unparseable %s insight output: %r", request[0], answer[:200])

    pairs = [pair for request in requests for pair in found[request]]
    for kind in dict.fromkeys(request[0] for request in requests):
        if not any(pair.kind == kind for pair in pairs):
            answer = last_answers.get(kind, "").strip().replace("\n", " | ")[:300]
            raise InsightError(
                f"the language model {loaded.name} gave no parseable {kind} insight after {attempts} attempts "
                f"(last output: {answer!r}). Write the insights to a file and pass insights=FILE, or raise attempts="
            )
    return _deduplicate(pairs)


def _deduplicate(pairs: Iterable[InsightPair]) -> list[InsightPair]:
    seen = set()
    unique = []
    for pair in pairs:
        key = (pair.kind, pair.first.lower(), pair.second.lower())
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    return unique


def _pair_from_item(item: Any, kind: str, where: str) -> InsightPair:
    if isinstance(item, str):
        pair = parse_insight_line(item, kind)
        if pair is None:
            raise ConfigError(f"{where}: {item!r} is not an insight; write '<concept>: <first text>; <second text>'")
        return pair
    if isinstance(item, dict):
        texts = item.get("texts")
        if isinstance(texts, list) and len(texts) == 2 and all(isinstance(text, str) and text.strip() for text in texts):
            return InsightPair(kind, str(item.get("concept", "")).strip() or "unnamed", texts[0].strip(), texts[1].strip())
    raise ConfigError(f"{where}: {item!r} is not an insight; give a line or an object with 'concept' and two 'texts'")


def read_insights_file(path: str | Path) -> list[InsightPair]:
    """Read insight pairs from a ``.txt`` or ``.json`` file (formats in the module docstring)."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"insights file {str(source)!r} not found; pass insights=lm to ask the language model instead")
    pairs: list[InsightPair] = []
    if source.suffix.lower() == ".json":
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source} is not valid JSON ({error})") from None
        if not isinstance(data, dict) or not set(data) <= set(KINDS):
            raise ConfigError(f'{source} must contain an object with the keys "harmful" and/or "helpful"')
        for kind in KINDS:
            for index, item in enumerate(data.get(kind, [])):
                pairs.append(_pair_from_item(item, kind, f"{source}: {kind}[{index}]"))
    else:
        kind = None
        for number, raw in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            header = line.strip("[] ").lower()
            if line.startswith("[") and header in KINDS:
                kind = header
                continue
            if kind is None:
                raise ConfigError(f"{source}:{number}: put a [harmful] or [helpful] line before the first insight")
            pairs.append(_pair_from_item(line, kind, f"{source}:{number}"))
    if not pairs:
        raise InsightError(f"{source} contains no insight pairs")
    return _deduplicate(pairs)
