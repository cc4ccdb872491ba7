"""Time OTTER's exact EMD against entropic Sinkhorn on one large batch.

The batch has n inputs and K classes with random logits (standard normal times
``--scale``) and a Dirichlet target distribution, all seeded. Each solver runs
``--rounds`` times on the same problem. The table gives the median time, the time ratio
to exact EMD (the baseline) and the share of predictions that agree with EMD.

Usage::

    python benchmarks/bench_otter.py [--n 10000] [--classes 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import ot
import torch

from labhooks_otter.transport import transport_plan


def main() -> None:
    parser = argparse.ArgumentParser(description="Exact EMD versus Sinkhorn for OTTER.")
    parser.add_argument("--n", type=int, default=10_000, help="inputs in the batch")
    parser.add_argument("--classes", type=int, default=100, help="classes")
    parser.add_argument("--scale", type=float, default=2.0, help="standard deviation of the random logits")
    parser.add_argument("--reg", type=float, default=0.05, help="Sinkhorn regularisation, in nats")
    parser.add_argument("--max-iterations", type=int, default=1000, help="Sinkhorn iteration limit")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per solver")
    arguments = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(arguments.n, arguments.classes, generator=generator, dtype=torch.float64) * arguments.scale
    target = np.random.default_rng(0).dirichlet(np.ones(arguments.classes))

    results = {}
    for solver in ("emd", "sinkhorn", "sinkhorn_log"):
        times = []
        for _ in range(arguments.rounds):
            started = time.perf_counter()
            plan = transport_plan(logits, target, solver=solver, reg=arguments.reg, max_iterations=arguments.max_iterations)
            times.append(time.perf_counter() - started)
        results[solver] = (statistics.median(times), plan.argmax(axis=1))

    baseline_time, baseline = results["emd"]
    print(
        f"OTTER transport, n={arguments.n}, K={arguments.classes}, reg={arguments.reg}, {arguments.max_iterations} Sinkhorn iterations max"
    )
    print(
        f"POT {ot.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, median of {arguments.rounds} runs"
    )
    print("| solver | time (s) | time / EMD | predictions equal to EMD |")
    print("|---|---|---|---|")
    for solver, (seconds, predictions) in results.items():
        print(f"| {solver} | {seconds:.2f} | {seconds / baseline_time:.2f} | {100 * float((predictions == baseline).mean()):.2f}% |")


if __name__ == "__main__":
    main()
