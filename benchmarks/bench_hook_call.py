"""Cost of one labhooks hook call, next to one tensor addition, in the same process.

Calls the registered hook callable directly on a (1, 1, 576) hidden state (the shape of a
decode step of SmolLM2-135M-Instruct), for a no-op intervention and a steering vector, and
reports microseconds per call and the ratio to one ``hidden + hidden``. Multiply by the
number of hooked sites to get the overhead per forward call.

    .venv/bin/python benchmarks/bench_hook_call.py
"""

from __future__ import annotations

import time

import torch
import transformers

import labhooks
from labhooks.attach import ContextTracker, _Hook
from labhooks.resolve import ModelSites

CALLS = 20000
ROUNDS = 5


def best_time_per_call(function) -> float:
    for _ in range(1000):
        function()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            function()
        best = min(best, (time.perf_counter() - start) / CALLS)
    return best


def main() -> None:
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3
    )
    model = transformers.LlamaForCausalLM(config).eval()
    tracker = ContextTracker()
    tracker.pre_hook(model, (), {"input_ids": torch.tensor([[5]])})
    resolved = ModelSites(model).resolve("post_block[0]")[0]
    hidden = torch.randn(1, 1, 576)

    addition = best_time_per_call(lambda: hidden + hidden)
    print(f"one tensor addition: {addition * 1e6:.2f} µs")
    interventions = {
        "no-op": labhooks.FunctionIntervention("post_block[0]", lambda state, context: state),
        "steering vector": labhooks.SteeringVector("post_block[0]", torch.randn(576)),
    }
    for name, intervention in interventions.items():
        hook = _Hook(intervention, resolved, tracker)
        per_call = best_time_per_call(lambda hook=hook: hook.forward_hook(None, (), hidden))
        print(f"{name:>16} hook: {per_call * 1e6:.2f} µs per call, {per_call / addition:.1f}x one addition")


if __name__ == "__main__":
    main()
