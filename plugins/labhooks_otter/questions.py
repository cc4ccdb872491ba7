"""Multiple-choice questions for measuring a language model's answer-position bias.

:func:`generate_arithmetic_questions` writes seeded arithmetic questions with four
shuffled options. The correct answer is at each position equally often, up to one
question when the count is not a multiple of four. :func:`option_scores` reads a causal
language model's logits for the option letters at the answer position, the scores OTTER
rebalances.

The packaged set ``data/arithmetic_mcq.jsonl`` was written by::

    python -m labhooks_otter.questions --count 400 --seed 0 --out plugins/labhooks_otter/data/arithmetic_mcq.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from labhooks.errors import ConfigError
from labhooks.generation import format_prompt
from labhooks.models import LoadedModel
from labhooks.progress import LoggingProgress, Progress

LETTERS = ("A", "B", "C", "D")
PACKAGED_QUESTIONS = "arithmetic_mcq.jsonl"
INSTRUCTION = "Answer with the letter of the correct option."


def _distractors(answer: int, rng: random.Random, count: int) -> list[int]:
    # Ten distinct near misses: off by 1, 2, 4, 10 or 20 either way.
    candidates = [answer + offset for offset in (-20, -10, -4, -2, -1, 1, 2, 4, 10, 20)]
    return sorted(rng.sample(candidates, count))


def generate_arithmetic_questions(count: int, seed: int = 0, num_options: int = 4) -> list[dict[str, Any]]:
    """Return ``count`` arithmetic questions, each with ``num_options`` options and the answer index."""
    if count < 1 or not 2 <= num_options <= len(LETTERS):
        raise ConfigError(f"count must be >= 1 and num_options between 2 and {len(LETTERS)}, got {count} and {num_options}")
    rng = random.Random(seed)
    positions = [index % num_options for index in range(count)]
    rng.shuffle(positions)
    questions = []
    for position in positions:
        operator = rng.choice(["+", "-", "*"])
        if operator == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            answer = a * b
        else:
            a = rng.randint(10, 99)
            b = rng.randint(1, a - 1) if operator == "-" else rng.randint(1, 60)
            answer = a + b if operator == "+" else a - b
        wrong = _distractors(answer, rng, num_options - 1)
        rng.shuffle(wrong)
        options = wrong[:position] + [answer] + wrong[position:]
        questions.append({"question": f"What is {a} {operator} {b}?", "options": [str(option) for option in options], "answer": position})
    return questions


def read_questions(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Read questions from a JSONL file (``question``, ``options``, optional ``answer``), or the packaged set."""
    if path is None:
        text = resources.files("labhooks_otter").joinpath("data", PACKAGED_QUESTIONS).read_text(encoding="utf-8")
        where = f"packaged {PACKAGED_QUESTIONS}"
    else:
        source = Path(path)
        if not source.is_file():
            raise ConfigError(f"questions file {str(source)!r} not found")
        text = source.read_text(encoding="utf-8")
        where = str(source)
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}:{number} is not valid JSON ({error})") from None
        options = record.get("options")
        if not isinstance(record.get("question"), str) or not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise ConfigError(f"{where}:{number}: expected a 'question' string and 2 to {len(LETTERS)} 'options'")
        questions.append(record)
    if not questions:
        raise ConfigError(f"{where} contains no questions")
    if len({len(record["options"]) for record in questions}) != 1:
        raise ConfigError(f"{where}: every question must have the same number of options")
    return questions


def question_prompt(record: dict[str, Any]) -> str:
    """Return the user message for one question: the question, lettered options, the instruction."""
    lines = [record["question"]] + [f"{letter}. {option}" for letter, option in zip(LETTERS, record["options"], strict=False)]
    return "\n".join(lines) + "\n" + INSTRUCTION


def letter_token_ids(tokenizer: Any, num_options: int) -> list[int]:
    """Return the vocabulary id of each option letter, tokenized as the first token of a reply."""
    ids = []
    for letter in LETTERS[:num_options]:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(f"the tokenizer splits the option letter {letter!r} into {len(encoded)} tokens; letter scores need one token")
        ids.append(int(encoded[0]))
    return ids


def encode_prompts(tokenizer: Any, records: Sequence[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenize the chat-formatted questions, left-padded so the answer position is the last column."""
    texts = [format_prompt(tokenizer, question_prompt(record)) for record in records]
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous
    return {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}


@torch.no_grad()
def option_scores(
    loaded: LoadedModel, records: Sequence[dict[str, Any]], batch_size: int = 16, progress: Progress | None = None
) -> torch.Tensor:
    """Return the model's logits for the option letters at the answer position, shape (questions, options)."""
    progress = progress or LoggingProgress()
    num_options = len(records[0]["options"])
    ids = letter_token_ids(loaded.tokenizer, num_options)
    device = next(loaded.model.parameters()).device
    parts = []
    starts = list(range(0, len(records), batch_size))
    for start in progress.track(starts, "scoring questions", total=len(starts)):
        batch = encode_prompts(loaded.tokenizer, records[start : start + batch_size], device)
        logits = loaded.model(**batch, logits_to_keep=1).logits[:, -1, :]
        parts.append(logits[:, ids].float().cpu())
    return torch.cat(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write seeded arithmetic multiple-choice questions as JSONL.")
    parser.add_argument("--count", type=int, default=400, help="number of questions")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--options", type=int, default=4, help="options per question (2 to 4)")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    arguments = parser.parse_args(argv)
    questions = generate_arithmetic_questions(arguments.count, arguments.seed, arguments.options)
    arguments.out.write_text("".join(json.dumps(question) + "\n" for question in questions), encoding="utf-8")


if __name__ == "__main__":
    main()
