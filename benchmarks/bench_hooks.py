"""Hook overhead during generation on the embedded default model.

Greedy generation of 64 new tokens with SmolLM2-135M-Instruct, batch 1 and batch 8, in
three settings: plain transformers, a no-op intervention at every post_block site, and a
steering vector at every post_block site. Each round runs the three settings once, in an
order that rotates from round to round, so that drift in machine speed hits every setting
alike. A setting's ratio is the median over rounds of its time divided by the plain time
of the same round. The spread is the lowest and highest of those per-round ratios.

On a small shared machine the per-round ratios scatter by a few percent, more than the
overhead itself. So the script also runs one generation per hooked setting with a timer
around every labhooks hook (the interventions and the context tracker at the model root)
and reports that time as a share of the plain generation: the overhead without the noise.

    .venv/bin/python benchmarks/bench_hooks.py [--rounds 10] [--threads 2]

Targets: no-op <= 1.01x and steering <= 1.03x of plain.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch

import labhooks
from labhooks.attach import ContextTracker, _Hook
from labhooks.generation import format_prompt

PROMPTS = [
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "What is 17 times 3?",
    "Give me a tip for learning a language.",
    "Why is the sky blue?",
    "Describe a cat in one sentence.",
]
NEW_TOKENS = 64


def _generate(model, batch, pad_id):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)


def _time_inside_hooks(model, batch, pad_id, interventions) -> float:
    """Generate once and return the seconds spent inside labhooks' hooks."""
    spent = [0.0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(_Hook, "forward_hook", timed(_Hook.forward_hook)))
        stack.enter_context(mock.patch.object(ContextTracker, "pre_hook", timed(ContextTracker.pre_hook)))
        with labhooks.attach(model, interventions):
            _generate(model, batch, pad_id)
    return spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds; each runs every setting once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    loaded = labhooks.load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    width = labhooks.sites(model).hidden_size()
    layers = labhooks.sites(model).num_layers()
    settings = {
        "plain": [],
        "no-op": [labhooks.FunctionIntervention("post_block[*]", lambda hidden, context: hidden)],
        "steering": [labhooks.SteeringVector("post_block[*]", torch.randn(width) * 0.01)],
    }

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{NEW_TOKENS} new tokens, {layers} post_block hooks per forward, {arguments.rounds} rounds\n")
    print(f"{'batch':>5} {'setting':>9} {'median s':>9} {'ratio':>7} {'spread':>13} {'per hook µs':>12} {'in hooks':>9}")
    names = list(settings)
    for batch_size in (1, 8):
        texts = [format_prompt(tokenizer, prompt) for prompt in PROMPTS[:batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        _generate(model, batch, tokenizer.pad_token_id)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(arguments.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                interventions = settings[name]
                handle = labhooks.attach(model, interventions) if interventions else None
                start = time.perf_counter()
                _generate(model, batch, tokenizer.pad_token_id)
                times[name].append(time.perf_counter() - start)
                if handle is not None:
                    handle.remove()
        plain = statistics.median(times["plain"])
        hook_calls = layers * NEW_TOKENS
        for name in names:
            ratios = [time_ / base for time_, base in zip(times[name], times["plain"], strict=True)]
            ratio = statistics.median(ratios)
            per_hook = (ratio - 1) * plain / hook_calls * 1e6
            spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
            inside = _time_inside_hooks(model, batch, tokenizer.pad_token_id, settings[name]) / plain if settings[name] else 0.0
            print(
                f"{batch_size:>5} {name:>9} {statistics.median(times[name]):>9.3f} {ratio:>7.3f} {spread:>13} "
                f"{per_hook:>12.1f} {100 * inside:>8.2f}%"
            )


if __name__ == "__main__":
    main()
