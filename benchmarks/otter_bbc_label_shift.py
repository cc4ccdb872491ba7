"""OTTER on BBC News topics under label shift, with all-MiniLM-L6-v2 as the zero-shot classifier.

The 2225 documents are embedded once (first 128 tokens). The test pool (half the documents)
is resampled to label shifts: the class proportions are drawn from a Dirichlet
distribution (seeded), and "no shift" is the test pool as it is. For each shift the table
gives the accuracy of

* zero-shot: argmax of the class-prompt similarities;
* prior matching to the true test distribution;
* OTTER with the true test distribution;
* OTTER with the distribution estimated by BBSE and by MLLS, from 10 labeled documents
  per topic of the other half (the source pool) and the unlabeled test batch;
* R-OTTER: log-weights fitted to OTTER's predictions on a validation batch drawn from the
  source pool with the same class proportions, then applied to each test document alone.

With ``--compare-templates`` it instead compares zero-shot and OTTER (true distribution)
on the unshifted test pool for several class-prompt templates and for their ensemble,
with the documents only one of the two gets right and McNemar's exact test on them.

Usage::

    python benchmarks/otter_bbc_label_shift.py [--size 500] [--cache bbc_embeddings.pt]
    python benchmarks/otter_bbc_label_shift.py --compare-templates --cache bbc_embeddings.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from zeroshot_data import BBC_PROMPT_TEMPLATE, BBC_TOPIC_WORDS, BBC_TOPICS, bbc_documents, bbc_pools, per_class_sample, shifted_sample

import labhooks
from labhooks.zeroshot import ZeroShotClassifier, accuracy
from labhooks_otter.interventions import OtterRebalance
from labhooks_otter.transport import estimate_bbse, estimate_mlls, fit_rotter, label_distribution, otter_predict, prior_matching

SHIFTS = (
    [("no shift", 0.0, 0)]
    + [(f"Dirichlet(1) seed {seed}", 1.0, seed) for seed in range(5)]
    + [(f"Dirichlet(0.3) seed {seed}", 0.3, seed) for seed in range(3)]
)
TEMPLATES = (
    BBC_PROMPT_TEMPLATE,
    "{} news",
    "a story about {}",
    "this article is about {}",
    "{}",
    "news about {}",
    "a BBC news report on {}",
    "the topic of this text is {}",
)
COLUMNS = ["zero-shot", "prior matching", "OTTER (true)", "OTTER (BBSE)", "OTTER (MLLS)", "R-OTTER"]


def embed_documents(classifier: ZeroShotClassifier, texts: list[str], cache: Path | None) -> torch.Tensor:
    if cache is not None and cache.is_file():
        return torch.load(cache)
    embeddings = classifier.predict_embeddings(texts, batch_size=32)
    if cache is not None:
        torch.save(embeddings, cache)
    return embeddings


def evaluate_shift(logits, labels, test, validation, labeled) -> list[float]:
    num_classes = len(BBC_TOPICS)
    test_logits, test_labels = logits[test], labels[test]
    truth = label_distribution(test_labels, num_classes)
    bbse = estimate_bbse(logits[labeled].argmax(-1), labels[labeled], test_logits.argmax(-1), num_classes)
    mlls = estimate_mlls(logits[labeled], labels[labeled], test_logits)
    pseudo_labels = otter_predict(logits[validation], truth)
    log_weights = fit_rotter(logits[validation], pseudo_labels)
    predictions = [
        test_logits.argmax(-1),
        prior_matching(test_logits, truth)[0],
        otter_predict(test_logits, truth),
        otter_predict(test_logits, bbse),
        otter_predict(test_logits, mlls),
        (test_logits + log_weights).argmax(-1),
    ]
    return [100 * accuracy(prediction, test_labels) for prediction in predictions]


def compare_templates(loaded, embeddings: torch.Tensor, labels: torch.Tensor, test: torch.Tensor) -> None:
    """Print zero-shot and OTTER accuracy on the unshifted test pool for each prompt template."""
    from scipy.stats import binomtest

    truth = label_distribution(labels[test], len(BBC_TOPICS))
    prompt_sets = [(repr(template), [template.format(word) for word in BBC_TOPIC_WORDS]) for template in TEMPLATES]
    prompt_sets.append(("ensemble of all eight", [[template.format(word) for template in TEMPLATES] for word in BBC_TOPIC_WORDS]))
    print("| class prompts | zero-shot | OTTER (true) | only zero-shot right | only OTTER right | McNemar p |")
    print("|---|---|---|---|---|---|")
    for name, prompts in prompt_sets:
        classifier = ZeroShotClassifier.from_loaded(loaded, prompts, class_names=list(BBC_TOPICS), max_length=128)
        with torch.no_grad():
            logits = classifier.head(embeddings[test])
        zero_shot_right = logits.argmax(-1) == labels[test]
        otter_right = otter_predict(logits, truth) == labels[test]
        only_zero_shot = int((zero_shot_right & ~otter_right).sum())
        only_otter = int((otter_right & ~zero_shot_right).sum())
        discordant = only_zero_shot + only_otter
        p_value = binomtest(only_otter, discordant).pvalue if discordant else 1.0
        print(
            f"| {name} | {100 * zero_shot_right.float().mean():.1f} | {100 * otter_right.float().mean():.1f} | "
            f"{only_zero_shot} | {only_otter} | {p_value:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="OTTER on BBC News under label shift.")
    parser.add_argument("--size", type=int, default=500, help="documents per shifted test batch and validation batch")
    parser.add_argument("--per-class", type=int, default=10, help="labeled source documents per topic for BBSE and MLLS")
    parser.add_argument("--cache", type=Path, default=None, help="file to keep the document embeddings in between runs")
    parser.add_argument("--template", default=BBC_PROMPT_TEMPLATE, help="class prompt, with {} for the topic word")
    parser.add_argument("--compare-templates", action="store_true", help="compare prompt templates without shift, then stop")
    arguments = parser.parse_args()

    started = time.perf_counter()
    loaded = labhooks.load_model(kind="encoder")
    prompts = [arguments.template.format(word) for word in BBC_TOPIC_WORDS]
    classifier = ZeroShotClassifier.from_loaded(loaded, prompts, class_names=list(BBC_TOPICS), max_length=128)
    texts, label_array = bbc_documents()
    embeddings = embed_documents(classifier, texts, arguments.cache)
    with torch.no_grad():
        logits = classifier.head(embeddings)
    labels = torch.from_numpy(label_array)
    source, test_pool = bbc_pools()
    if arguments.compare_templates:
        compare_templates(loaded, embeddings, labels, torch.from_numpy(test_pool))
        return
    labeled = torch.from_numpy(per_class_sample(source, label_array, arguments.per_class, np.random.default_rng(100)))
    embedded = time.perf_counter()

    rows = []
    for name, alpha, seed in SHIFTS:
        rng = np.random.default_rng(seed)
        if alpha == 0:
            test = test_pool
            proportions = label_distribution(labels[test], len(BBC_TOPICS)).numpy().astype(np.float64)
        else:
            proportions = rng.dirichlet(np.full(len(BBC_TOPICS), alpha))
            test = shifted_sample(test_pool, label_array, proportions, arguments.size, rng)
        validation = shifted_sample(
            source, label_array, proportions / proportions.sum(), arguments.size, np.random.default_rng(1000 + seed)
        )
        test_index, validation_index = torch.from_numpy(test), torch.from_numpy(validation)
        rows.append((name, proportions, evaluate_shift(logits, labels, test_index, validation_index, labeled)))

    # The logits-site intervention rebalances the same batch as the function does.
    test_index = torch.from_numpy(test_pool)
    truth = label_distribution(labels[test_index], len(BBC_TOPICS))
    with torch.no_grad(), labhooks.attach(classifier, OtterRebalance("logits", truth)):
        hooked = classifier.head(embeddings[test_index]).argmax(-1)
    if not torch.equal(hooked, otter_predict(logits[test_index], truth)):
        raise SystemExit("the OtterRebalance intervention disagrees with otter_predict")

    print(f"class prompts: {', '.join(repr(prompt) for prompt in prompts)}; {arguments.per_class} labeled documents per topic\n")
    print(f"| shift | largest class share | {' | '.join(COLUMNS)} |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, proportions, scores in rows:
        print(f"| {name} | {100 * proportions.max():.0f}% | " + " | ".join(f"{score:.1f}" for score in scores) + " |")
    shifted = np.array([scores for name, _, scores in rows if name != "no shift"])
    print("| mean over shifts | | " + " | ".join(f"{value:.1f}" for value in shifted.mean(axis=0)) + " |")
    gains = shifted[:, 2] - shifted[:, 0]
    print(f"\nOTTER (true distribution) minus zero-shot, mean over the {len(gains)} shifted batches: {gains.mean():+.1f} points")
    print(f"embedding {len(texts)} documents: {embedded - started:.0f} s; everything: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
