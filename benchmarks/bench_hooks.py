"""Hook overhead during generation on the embedded default model.

Greedy generation of 64 new tokens with SmolLM2-135M-Instruct, batch 1 and batch 8, in
three settings: plain transformers, a no-op intervention at every post_block site, and a
steering vector at every post_block site. The settings run interleaved, several rounds,
and each ratio is the median time of a setting over the median plain time of the same run.

    .venv/bin/python benchmarks/bench_hooks.py [--rounds 5] [--threads 2]

Targets: no-op <= 1.01x and steering <= 1.03x of plain.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import labhooks
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
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
    print(f"{'batch':>5} {'setting':>9} {'median s':>9} {'ratio':>7} {'per hook µs':>12}")
    for batch_size in (1, 8):
        texts = [format_prompt(tokenizer, prompt) for prompt in PROMPTS[:batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        _generate(model, batch, tokenizer.pad_token_id)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(arguments.rounds):
            for name, interventions in settings.items():
                handle = labhooks.attach(model, interventions) if interventions else None
                start = time.perf_counter()
                _generate(model, batch, tokenizer.pad_token_id)
                times[name].append(time.perf_counter() - start)
                if handle is not None:
                    handle.remove()
        plain = statistics.median(times["plain"])
        hook_calls = layers * NEW_TOKENS
        for name in settings:
            median = statistics.median(times[name])
            per_hook = (median - plain) / hook_calls * 1e6 if name != "plain" else 0.0
            print(f"{batch_size:>5} {name:>9} {median:>9.3f} {median / plain:>7.3f} {per_hook:>12.1f}")


if __name__ == "__main__":
    main()
