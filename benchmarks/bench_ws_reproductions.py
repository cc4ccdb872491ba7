"""Reproductions of the weak-supervision experiments on simulated sources, as Markdown tables.

* synthetic: sources with known accuracies (uniform errors, independent abstains);
  for every label model, the largest error of its estimated accuracies and its
  aggregate accuracy, at n = 10,000.
* cardinality: three sources with theta = (4, 0.5, 0.5) on plain classification,
  cardinality 2 to 20, n = 10,000, three seeds.
* tree: the same sources on a tree with three branches of b nodes, b = 1 to 20,
  n = 1000, five seeds.
* game24: three sources of noisy game-of-24 expressions with theta = (5, 0.6, 0.5),
  200 puzzles per seed, ten seeds.

    .venv/bin/python benchmarks/bench_ws_reproductions.py [--only synthetic,cardinality,tree,game24]
"""

from __future__ import annotations

import argparse
import logging
import time

from labhooks.methods import ReportTable
from labhooks_ws import reproductions

EXPERIMENTS = ("synthetic", "cardinality", "tree", "game24")


def _markdown(table: ReportTable) -> str:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in table.rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated experiments to run")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("labhooks_ws.pseudo_euclidean").setLevel(logging.WARNING)

    chosen = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    for name in chosen:
        started = time.perf_counter()
        if name == "synthetic":
            table = reproductions.synthetic_experiment(10_000, seed=1)
        elif name == "cardinality":
            table = reproductions.cardinality_experiment([2, 3, 4, 6, 8, 10, 15, 20], 10_000, [0, 1, 2])
        elif name == "tree":
            table = reproductions.tree_experiment([1, 2, 3, 5, 8, 10, 15, 20], 1000, [0, 1, 2, 3, 4])
        else:
            table = reproductions.game24_experiment(200, list(range(10)))
        print(_markdown(table))
        print(f"\n({name}: {time.perf_counter() - started:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
