"""Fitting time and accuracy of label models on a large synthetic label matrix.

One seeded matrix of 1,000,000 examples and 10 conditionally independent sources
(accuracies 0.55 to 0.9, each voting on 70-95% of the examples, uniform errors, binary
by default) is aggregated by majority vote, the FlyingSquid triplet method,
Dawid-Skene EM and Snorkel's LabelModel with its default fit (100 steps, lr 0.01,
SGD). Every method is fitted ``--repeats`` times in interleaved rounds; the table gives
the median fitting time (validation of the matrix included), the accuracy of the
predicted labels against the true labels, and the ratio of Snorkel's time to each
method's time. The target is FlyingSquid at least 20 times faster than Snorkel with
accuracy within one point.

    .venv/bin/python benchmarks/bench_aggregators.py [--examples 1000000] [--cardinality 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import numpy as np

from labhooks.aggregators import Aggregator
from labhooks_ws.dawid_skene import DawidSkene
from labhooks_ws.majority import MajorityVote
from labhooks_ws.simulate import simulate_label_matrix
from labhooks_ws.snorkel_model import SnorkelLabelModel
from labhooks_ws.triplet import FlyingSquid

ACCURACIES = [0.9, 0.85, 0.8, 0.75, 0.7, 0.7, 0.65, 0.6, 0.6, 0.55]
COVERAGE = [0.95, 0.7, 0.9, 0.8, 0.85, 0.9, 0.75, 0.95, 0.8, 0.9]


def _fit_seconds(build: type[Aggregator], options: dict, matrix: np.ndarray, cardinality: int) -> tuple[float, Aggregator]:
    model = build(**options)
    started = time.perf_counter()
    model.fit(matrix, cardinality=cardinality)
    return time.perf_counter() - started, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1_000_000, help="rows of the label matrix")
    parser.add_argument("--cardinality", type=int, default=2, help="number of classes")
    parser.add_argument("--repeats", type=int, default=3, help="fits per method; the median time is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated matrix")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    matrix, truth = simulate_label_matrix(arguments.examples, ACCURACIES, arguments.cardinality, coverage=COVERAGE, seed=arguments.seed)
    methods: dict[str, tuple[type[Aggregator], dict]] = {
        "majority_vote": (MajorityVote, {}),
        "flyingsquid": (FlyingSquid, {}),
        "dawid_skene": (DawidSkene, {}),
        "snorkel (default fit)": (SnorkelLabelModel, {}),
    }
    # One unmeasured fit per method first, so imports (snorkel, scipy) are not timed.
    for build, options in methods.values():
        build(**options).fit(matrix[:2000], cardinality=arguments.cardinality)

    times: dict[str, list[float]] = {name: [] for name in methods}
    accuracy: dict[str, float] = {}
    for _ in range(arguments.repeats):
        for name, (build, options) in methods.items():
            seconds, model = _fit_seconds(build, options, matrix, arguments.cardinality)
            times[name].append(seconds)
            accuracy[name] = float(np.mean(model.predict(matrix) == truth))

    baseline = statistics.median(times["snorkel (default fit)"])
    print(
        f"{arguments.examples:,} examples x {matrix.shape[1]} sources, {arguments.cardinality} classes, "
        f"median of {arguments.repeats} fits; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print("| method | fit time (s) | Snorkel time / time | accuracy | accuracy - Snorkel's |")
    print("|---|---|---|---|---|")
    for name in methods:
        median = statistics.median(times[name])
        print(
            f"| {name} | {median:.3f} | {baseline / median:.1f}x | {accuracy[name]:.4f} | {100 * (accuracy[name] - accuracy['snorkel (default fit)']):+.2f} points |"
        )


if __name__ == "__main__":
    main()
