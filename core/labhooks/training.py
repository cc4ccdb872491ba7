"""Training trainable interventions, and weight-space baselines, on prompt/completion data.

The loop runs on ``accelerate``: ``accelerate launch`` spreads it over several GPUs or
nodes with no change here, and on one CPU it runs as a plain loop. The model and the
interventions are wrapped in one module so that data-parallel training averages the
gradients of both. What trains is decided by ``requires_grad``: :func:`fit` freezes the
base model by default, and weight-space baselines (LoRA, full fine-tuning) opt out.

Data is a JSONL or CSV file of ``prompt`` and ``completion`` fields. The prompt is
formatted with the tokenizer's chat template (as :func:`labhooks.generation.generate_texts`
does at evaluation), the completion is followed by the EOS token, and the loss is the
mean cross-entropy over completion tokens only: prompt and padding are masked.

Prompts are left-padded and completions right-padded, so a batch is
``[pad.. prompt | completion ..pad]`` with explicit position ids. When an intervention
selects positions relative to the prompt (``last_prompt``, ``prompt``, ``generated``), a
short priming call on the prompt alone lets the core record where each prompt ends, and the full
call then extends those ids, and the core keeps the prompt lengths as it does for an
uncached decode step. The edit therefore lands on the same tokens as during generation.

Checkpoints are complete bundles: the interventions, the trainable model weights under
``weights.*``, the optimizer state under ``optimizer.*`` and the RNG state, with the step
in the manifest metadata. :func:`fit` resumes from such a bundle.

Plugins contribute :class:`TrainableMethod` objects through the ``labhooks_trainers``
hook; ``labhooks train`` builds their config and calls ``train``.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import logging
import math
import random
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from labhooks.attach import attach
from labhooks.bundles import Bundle, load_bundle, save_bundle
from labhooks.config import config_to_dict, option
from labhooks.errors import ConfigError
from labhooks.generation import format_prompt, generate_texts
from labhooks.intervention import Intervention
from labhooks.methods import ReportTable
from labhooks.models import LoadedModel
from labhooks.progress import LoggingProgress, Progress
from labhooks.resolve import unwrap_model

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
WEIGHTS_PREFIX = "weights."
OPTIMIZER_PREFIX = "optimizer."
RNG_KEY = "rng.cpu"


# Data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One prompt and the completion the model should learn to produce after it."""

    prompt: str
    completion: str


def _example_from_record(record: Mapping[str, Any], where: str) -> Example:
    missing = [key for key in ("prompt", "completion") if key not in record]
    if missing:
        raise ConfigError(f"{where} has no {' or '.join(missing)} field; each example needs 'prompt' and 'completion'")
    prompt, completion = record["prompt"], record["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ConfigError(
            f"{where}: 'prompt' and 'completion' must be strings, got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if not completion.strip():
        raise ConfigError(f"{where}: the completion is empty; every example needs a completion to learn")
    return Example(prompt, completion)


def load_examples(path: str | Path) -> list[Example]:
    """Read prompt/completion examples from a JSONL file (one object per line) or a CSV file with a header.

    Raises :class:`ConfigError` naming the file and line when the file is missing, empty or malformed.
    """
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"data file {str(source)!r} not found")
    suffix = source.suffix.lower()
    examples: list[Example] = []
    if suffix in (".jsonl", ".json"):
        with source.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{source}, line {number}: not valid JSON ({error}); write one JSON object per line") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{source}, line {number}: expected a JSON object with prompt and completion")
                examples.append(_example_from_record(record, f"{source}, line {number}"))
    elif suffix in (".csv", ".tsv"):
        with source.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            for number, row in enumerate(reader, start=2):
                examples.append(_example_from_record(row, f"{source}, line {number}"))
    else:
        raise ConfigError(f"data file {str(source)!r} must end in .jsonl or .csv (or .tsv), with prompt and completion fields")
    if not examples:
        raise ConfigError(f"data file {str(source)!r} contains no examples")
    return examples


def write_examples(path: str | Path, examples: Iterable[Example]) -> Path:
    """Write examples as JSONL, the format :func:`load_examples` reads."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"prompt": example.prompt, "completion": example.completion}) + "\n")
    return target


# Parsers that read an answer for evaluation ---------------------------------------------------------


def _first_word(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text.lower())
    return words[0] if words else ""


def _first_digit(text: str) -> str:
    match = re.search(r"\d", text)
    return match.group(0) if match else ""


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0].strip().lower() if stripped else ""


PARSERS: dict[str, Callable[[str], str]] = {
    "exact": lambda text: text.strip(),
    "first_word": _first_word,
    "first_digit": _first_digit,
    "first_line": _first_line,
}


# Config ------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """Options every trainable method shares; a method's config subclasses this one."""

    # A method's own options that must be >= 1 (a rank, a head count), checked by validate().
    positive_options: ClassVar[tuple[str, ...]] = ()

    data: str | None = option(None, "training data: a JSONL or CSV file with prompt and completion fields")
    eval_data: str | None = option(None, "evaluation data in the same format; without it, eval_size examples are held out of data")
    eval_size: int = option(64, "examples held out of data for evaluation when eval_data is not given (0: no evaluation)", unit="examples")
    steps: int = option(200, "optimizer steps", unit="steps")
    batch_size: int = option(8, "examples per micro-batch", unit="examples")
    gradient_accumulation: int = option(1, "micro-batches per optimizer step", unit="micro-batches")
    learning_rate: float = option(1e-3, "peak learning rate of AdamW")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = option("linear", "learning-rate schedule after the warm-up")
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming the learning rate up from 0", unit="fraction")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient norm clip (0: no clipping)")
    max_prompt_tokens: int = option(
        256, "prompts are cut to their first this many tokens before the chat template is applied", unit="tokens"
    )
    max_completion_tokens: int = option(32, "completions are cut to this many tokens before the EOS token is added", unit="tokens")
    system: str | None = option(None, "system message for the chat template (None: the template's default)")
    parser: str = option("first_word", "how an answer is read from a completion for accuracy", choices=tuple(PARSERS))
    max_new_tokens: int = option(8, "tokens generated per evaluation example (greedy)", unit="tokens")
    eval_batch_size: int = option(16, "prompts per generation batch at evaluation", unit="prompts")
    eval_every: int = option(0, "evaluate every this many steps (0: only at the end)", unit="steps")
    save_every: int = option(0, "write a checkpoint bundle every this many steps (0: none)", unit="steps")
    checkpoint_dir: str | None = option(None, "folder for checkpoint bundles (default: next to the output bundle)")
    resume_from: str | None = option(None, "checkpoint bundle to resume training from")
    seed: int = option(0, "seed for data order, initialisation and sampling")
    gradient_checkpointing: bool = option(False, "recompute block activations in the backward pass to save memory")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "autocast precision passed to accelerate")
    log_every: int = option(10, "log the loss every this many steps", unit="steps")

    def validate(self) -> None:
        positive = (
            "steps",
            "batch_size",
            "gradient_accumulation",
            "max_prompt_tokens",
            "max_completion_tokens",
            "max_new_tokens",
            "eval_batch_size",
            "log_every",
            *self.positive_options,
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid value {getattr(self, name)} for {name}: must be >= 1")
        for name in ("eval_size", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid value {getattr(self, name)} for {name}: must be >= 0")
        if self.learning_rate <= 0:
            raise ConfigError(f"invalid value {self.learning_rate} for learning_rate: must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"invalid value {self.warmup_ratio} for warmup_ratio: must be in [0, 1)")
        if self.parser not in PARSERS:
            raise ConfigError(f"invalid value {self.parser!r} for parser: choose one of {', '.join(PARSERS)}")


def split_examples(
    config: TrainingConfig, examples: Sequence[Example] | None = None, eval_examples: Sequence[Example] | None = None
) -> tuple[list[Example], list[Example]]:
    """Return the training and evaluation examples.

    Examples given in code replace ``data`` and ``eval_data``. Without evaluation examples
    or ``eval_data``, ``eval_size`` examples are held out of the training pool after a
    shuffle seeded by ``seed``, and at least one example is left for training.
    """
    if eval_examples is not None:
        pool = list(examples) if examples is not None else split_examples(replace(config, eval_size=0, eval_data=None))[0]
        return pool, list(eval_examples)
    if examples is None:
        if config.data is None:
            raise ConfigError("missing data=FILE: a JSONL or CSV file with prompt and completion fields")
        examples = load_examples(config.data)
    pool = list(examples)
    if config.eval_data is not None:
        return pool, load_examples(config.eval_data)
    if config.eval_size == 0:
        return pool, []
    if config.eval_size >= len(pool):
        raise ConfigError(
            f"eval_size={config.eval_size} leaves no training examples out of {len(pool)}; lower eval_size or give eval_data=FILE"
        )
    random.Random(config.seed).shuffle(pool)
    return pool[config.eval_size :], pool[: config.eval_size]


# Tokenization and batches --------------------------------------------------------------


def truncate_prompt(tokenizer: Any, prompt: str, max_tokens: int) -> str:
    """Cut a raw prompt to its first ``max_tokens`` tokens (before any chat template)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    return tokenizer.decode(ids[:max_tokens])


@dataclass
class EncodedExample:
    prompt_ids: list[int]
    completion_ids: list[int]


def encode_example(tokenizer: Any, example: Example, config: TrainingConfig) -> EncodedExample:
    """Tokenize one example formatted as at evaluation, with the EOS token after the completion."""
    prompt = truncate_prompt(tokenizer, example.prompt, config.max_prompt_tokens)
    # Chat templates contain the special tokens they need, as in generation.py.
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt, config.system), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"][: config.max_completion_tokens]
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, so a completion's end cannot be learned")
    return EncodedExample(list(prompt_ids), [*completion_ids, int(tokenizer.eos_token_id)])


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Build ``[pad.. prompt | completion ..pad]`` rows with their masks, position ids and labels."""
    prompt_length = max(len(example.prompt_ids) for example in examples)
    completion_length = max(len(example.completion_ids) for example in examples)
    batch = len(examples)
    prompt_ids = torch.full((batch, prompt_length), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(batch, prompt_length, dtype=torch.long)
    completion_ids = torch.full((batch, completion_length), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(batch, completion_length, dtype=torch.long)
    for row, example in enumerate(examples):
        count = len(example.prompt_ids)
        prompt_ids[row, prompt_length - count :] = torch.tensor(example.prompt_ids)
        prompt_mask[row, prompt_length - count :] = 1
        count = len(example.completion_ids)
        completion_ids[row, :count] = torch.tensor(example.completion_ids)
        completion_mask[row, :count] = 1
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "labels": completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX),
        "prompt_length": torch.tensor(prompt_length),
    }


# Parameter counts ----------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCount:
    """Trainable parameters, as a count and as a percentage of the base model's parameters."""

    trainable: int
    base: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else float("nan")

    def __str__(self) -> str:
        return f"{self.trainable:,} ({self.percent:.3g}% of {self.base:,})"


def count_base_parameters(model: nn.Module) -> int:
    """Count a model's parameters; tied weights (input and output embeddings) count once.

    ``parameters()`` yields a shared ``nn.Parameter`` once, and this works on the meta device.
    """
    return sum(parameter.numel() for parameter in unwrap_model(model).parameters())


def count_trainable_parameters(modules: Iterable[nn.Module], base: int) -> ParameterCount:
    """Count the distinct parameters with ``requires_grad`` across the modules."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return ParameterCount(total, base)


# Evaluation --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Accuracy of greedy generations, read by a parser, against the expected completions."""

    accuracy: float
    rows: list[tuple[str, str, str, bool]]

    @property
    def num_examples(self) -> int:
        return len(self.rows)


def evaluate(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], config: TrainingConfig, progress: Progress | None = None
) -> Evaluation:
    """Generate greedily for each prompt and compare the parsed answer with the parsed completion.

    Interventions attached to ``model`` stay attached and edit the generations.
    """
    if not examples:
        return Evaluation(float("nan"), [])
    parse = PARSERS[config.parser]
    prompts = [truncate_prompt(tokenizer, example.prompt, config.max_prompt_tokens) for example in examples]
    outputs = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size,
        system=config.system,
        progress=progress,
        description="evaluating",
    )
    rows = []
    for example, output in zip(examples, outputs, strict=True):
        expected = parse(example.completion)
        predicted = parse(output)
        rows.append((example.prompt, expected, output, predicted == expected and expected != ""))
    accuracy = sum(row[3] for row in rows) / len(rows)
    return Evaluation(accuracy, rows)


# The training loop ---------------------------------------------------------------------


class TrainingModule(nn.Module):
    """The model and its interventions in one module, so data-parallel wrappers see every parameter."""

    def __init__(self, model: nn.Module, interventions: Sequence[Intervention]) -> None:
        super().__init__()
        self.model = model
        self.interventions = nn.ModuleList(interventions)

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def intervention_list(self) -> list[Intervention]:
        return [intervention for intervention in self.interventions if isinstance(intervention, Intervention)]


class _PrimingDone(Exception):
    """Raised by the priming hook once the core has read the prompt lengths."""


def _needs_priming(interventions: Sequence[Intervention]) -> bool:
    return any(not intervention.positions.is_all for intervention in interventions)


@dataclass
class CheckpointNaming:
    """Plugin, method and config recorded in each checkpoint bundle."""

    plugin: str | None = None
    method: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    """Measurements of one :func:`fit` run: loss history, evaluations, step time and memory."""

    history: list[dict[str, Any]]
    evaluations: list[tuple[int, Evaluation]]
    seconds_per_step: float
    peak_memory_mb: float
    steps: int
    checkpoints: list[Path] = field(default_factory=list)
    main_process: bool = True

    @property
    def final_evaluation(self) -> Evaluation | None:
        return self.evaluations[-1][1] if self.evaluations else None

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux: the peak resident size of the whole process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def completion_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], supports_logits_to_keep: bool) -> torch.Tensor:
    """Return the mean cross-entropy over the completion tokens of a collated batch."""
    labels = batch["labels"]
    completion_length = labels.shape[1]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    if supports_logits_to_keep:
        inputs["logits_to_keep"] = completion_length + 1
    logits = model(**inputs).logits[:, -(completion_length + 1) : -1]
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{OPTIMIZER_PREFIX}{index}.{key}"] = tensor
    groups = []
    for group in state["param_groups"]:
        groups.append({key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items()})
    return tensors, groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, bundle: Bundle) -> None:
    groups = bundle.manifest.get("metadata", {}).get("training", {}).get("optimizer_groups")
    if groups is None:
        raise ConfigError(f"{bundle.path} has no optimizer state; resume from a checkpoint written by labhooks training")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in bundle.tensors.items():
        if name.startswith(OPTIMIZER_PREFIX):
            index, key = name[len(OPTIMIZER_PREFIX) :].split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
    current = optimizer.state_dict()["param_groups"]
    if [len(group["params"]) for group in current] != [len(group["params"]) for group in groups]:
        raise ConfigError(
            f"{bundle.path} was written for other trainable parameters than this run has; resume with the same method and options"
        )
    optimizer.load_state_dict(
        {"state": state, "param_groups": [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in groups]}
    )


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the trainable parameters of a model by name, for the ``weights.*`` bundle tensors."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_weight_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy the ``weights.*`` tensors of a bundle into a model's parameters; return how many were copied.

    Raises :class:`ConfigError` when a name is not a parameter of the model.
    """
    parameters = dict(model.named_parameters())
    copied = 0
    for key, tensor in tensors.items():
        if not key.startswith(WEIGHTS_PREFIX):
            continue
        name = key[len(WEIGHTS_PREFIX) :]
        target = parameters.get(name)
        if target is None:
            raise ConfigError(
                f"the bundle has weights for {name!r}, which this model does not have; load it with the model and method it was trained with"
            )
        if target.shape != tensor.shape:
            raise ConfigError(f"the bundle's weights for {name!r} have shape {list(tensor.shape)}, the model's {list(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        copied += 1
    return copied


def _micro_batches(
    encoded: Sequence[EncodedExample], config: TrainingConfig, pad_id: int, accelerator: Any, skip: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield micro-batches forever: one seeded shuffle per epoch, sharded by accelerate, ``skip`` skipped."""
    from torch.utils.data import DataLoader

    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        dataset: Any = list(encoded)
        loader: Any = DataLoader(
            dataset, batch_size=config.batch_size, shuffle=True, generator=generator, collate_fn=lambda items: collate(items, pad_id)
        )
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
        if skip >= len(loader):
            skip -= len(loader)
            epoch += 1
            continue
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
            skip = 0
        yield from loader
        epoch += 1


def _restore(
    resume: Bundle,
    phase: str,
    model: nn.Module,
    interventions: Sequence[Intervention],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    processes: int,
) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint's weights, interventions, optimizer, schedule and RNG state; return its step and history."""
    training_state = resume.manifest.get("metadata", {}).get("training", {})
    if training_state.get("phase", phase) != phase:
        raise ConfigError(f"{resume.path} is a checkpoint of phase {training_state.get('phase')!r}, not {phase!r}")
    if len(resume.interventions) != len(interventions):
        raise ConfigError(
            f"{resume.path} contains {len(resume.interventions)} interventions but this run trains {len(interventions)}; "
            "resume with the same method and options"
        )
    start_step = int(training_state.get("step", 0))
    load_weight_tensors(model, resume.tensors)
    for intervention, restored in zip(interventions, resume.interventions, strict=True):
        intervention.load_state_dict(restored.state_dict())
    _restore_optimizer(optimizer, resume)
    with warnings.catch_warnings():
        # Fast-forwarding the schedule before any optimizer step is intended here.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*")
        for _ in range(start_step * processes):
            scheduler.step()
    if RNG_KEY in resume.tensors:
        torch.set_rng_state(resume.tensors[RNG_KEY])
    logger.info("resuming %s from step %d of %s", phase, start_step, resume.path)
    return start_step, list(training_state.get("history", []))


def _prime_positions(root: nn.Module, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """Run the model root's pre-hooks on the prompt part alone, so the core records each row's prompt length.

    A hook registered after the core's raises before the embeddings or any block run. The
    full call that follows extends these ids, so the core keeps the prompt lengths.
    """

    def stop_after_context(module: nn.Module, args: Any, kwargs: Any) -> None:
        raise _PrimingDone

    prompt_length = int(batch["prompt_length"])
    stopper = root.register_forward_pre_hook(stop_after_context, with_kwargs=True)
    try:
        model(input_ids=batch["input_ids"][:, :prompt_length], attention_mask=batch["attention_mask"][:, :prompt_length])
    except _PrimingDone:
        pass
    finally:
        stopper.remove()


def fit(
    loaded: LoadedModel,
    config: TrainingConfig,
    train_examples: Sequence[Example],
    eval_examples: Sequence[Example] = (),
    *,
    interventions: Sequence[Intervention] = (),
    model: nn.Module | None = None,
    freeze_base: bool = True,
    parameter_groups: Sequence[Mapping[str, Any]] | None = None,
    penalty: Callable[[float], torch.Tensor] | None = None,
    naming: CheckpointNaming | None = None,
    phase: str = "train",
    resume: Bundle | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Train the interventions (and any trainable model weights) on the examples.

    ``model`` defaults to ``loaded.model``; pass a peft-wrapped model for LoRA. With
    ``freeze_base`` every parameter of the model is frozen first, so only the
    interventions train. ``parameter_groups`` (AdamW groups with ``params`` and an
    optional ``lr``) replace the default single group. ``penalty(fraction_done)`` is added
    to the loss at every micro-batch (an L1 or expected-L0 term). ``phase`` names this run
    in checkpoints, for methods with several stages. The interventions stay attached to
    the model until the function returns.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    progress = progress or LoggingProgress()
    naming = naming or CheckpointNaming()
    run_model = model if model is not None else loaded.model
    tokenizer = loaded.tokenizer
    if not train_examples:
        raise ConfigError("no training examples: give data=FILE with at least one prompt/completion pair")
    set_seed(config.seed)

    if freeze_base:
        for parameter in run_model.parameters():
            parameter.requires_grad_(False)
    if config.gradient_checkpointing:
        enable = getattr(run_model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise ConfigError(f"{type(run_model).__name__} does not support gradient checkpointing; set gradient_checkpointing=false")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    wrapper = TrainingModule(run_model, interventions)
    if parameter_groups is None:
        trainable = [parameter for parameter in wrapper.parameters() if parameter.requires_grad]
        parameter_groups = [{"params": trainable}]
    groups = [dict(group) for group in parameter_groups if list(group["params"])]
    if not groups:
        raise ConfigError("nothing to train: no parameter has requires_grad set")

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    processes = accelerator.num_processes
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * config.steps) * processes,
        num_training_steps=config.steps * processes,
    )

    start_step = 0
    history: list[dict[str, Any]] = []
    if resume is not None:
        start_step, history = _restore(resume, phase, run_model, interventions, optimizer, scheduler, processes)

    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)
    inner = accelerator.unwrap_model(wrapper)
    root = unwrap_model(inner.model)
    supports_logits_to_keep = _accepts(root, "logits_to_keep")
    encoded = [encode_example(tokenizer, example, config) for example in train_examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = _micro_batches(encoded, config, pad_id, accelerator, start_step * config.gradient_accumulation)

    handle = attach(inner.model, inner.intervention_list())
    priming = _needs_priming(inner.intervention_list())
    evaluations: list[tuple[int, Evaluation]] = []
    checkpoints: list[Path] = []
    step_times: list[float] = []
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        wrapper.train()
        steps = range(start_step, config.steps)
        for step in progress.track(steps, f"training {phase}", total=len(steps)):
            started = time.perf_counter()
            total_loss = 0.0
            for micro in range(config.gradient_accumulation):
                batch = next(batches)
                if priming:
                    _prime_positions(root, inner.model, batch)
                last = micro == config.gradient_accumulation - 1
                sync = accelerator.no_sync(wrapper) if not last else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    loss = completion_loss(wrapper, batch, supports_logits_to_keep)
                    if penalty is not None:
                        loss = loss + penalty((step + micro / config.gradient_accumulation) / config.steps)
                    accelerator.backward(loss / config.gradient_accumulation)
                total_loss += float(loss.detach()) / config.gradient_accumulation
            if processes > 1:
                total_loss = float(accelerator.reduce(torch.tensor(total_loss, device=accelerator.device), reduction="mean"))
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_([p for group in groups for p in group["params"]], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - started)
            done = step + 1
            history.append({"step": done, "loss": total_loss, "lr": scheduler.get_last_lr()[0]})
            if done % config.log_every == 0 or done == config.steps:
                logger.info("%s step %d/%d: loss %.4f, lr %.3g", phase, done, config.steps, total_loss, history[-1]["lr"])
            if not math.isfinite(total_loss):
                raise ConfigError(f"the loss became {total_loss} at step {done}; lower learning_rate (now {config.learning_rate})")
            if config.eval_every and done % config.eval_every == 0 and done < config.steps and eval_examples:
                evaluations.append((done, _evaluate_main(accelerator, inner, tokenizer, eval_examples, config)))
                wrapper.train()
            if config.save_every and done % config.save_every == 0 and accelerator.is_main_process:
                checkpoints.append(
                    save_checkpoint(_checkpoint_path(config, naming, phase, done), inner, optimizer, naming, phase, done, history)
                )
        if eval_examples:
            evaluations.append((config.steps, _evaluate_main(accelerator, inner, tokenizer, eval_examples, config)))
    finally:
        handle.remove()
        wrapper.eval()
        if config.gradient_checkpointing:
            disable = getattr(run_model, "gradient_checkpointing_disable", None)
            if callable(disable):
                disable()
    timed = step_times[1:] or step_times
    seconds_per_step = sum(timed) / len(timed) if timed else float("nan")
    return FitResult(history, evaluations, seconds_per_step, _peak_memory_mb(), config.steps, checkpoints, accelerator.is_main_process)


def _evaluate_main(
    accelerator: Any, inner: TrainingModule, tokenizer: Any, examples: Sequence[Example], config: TrainingConfig
) -> Evaluation:
    """Evaluate on the main process (generation needs no gradient synchronisation)."""
    inner.eval()
    evaluation = Evaluation(float("nan"), [])
    if accelerator.is_main_process:
        evaluation = evaluate(inner.model, tokenizer, examples, config)
        logger.info("evaluation: accuracy %.3f on %d examples", evaluation.accuracy, evaluation.num_examples)
    accelerator.wait_for_everyone()
    return evaluation


def _checkpoint_path(config: TrainingConfig, naming: CheckpointNaming, phase: str, step: int) -> Path:
    folder = (
        Path(config.checkpoint_dir)
        if config.checkpoint_dir
        else Path(f"{naming.plugin or 'labhooks'}-{naming.method or 'train'}-checkpoints")
    )
    return folder / f"{phase}-step{step:06d}.safetensors"


def save_checkpoint(
    path: str | Path,
    inner: TrainingModule,
    optimizer: torch.optim.Optimizer,
    naming: CheckpointNaming,
    phase: str,
    step: int,
    history: Sequence[Mapping[str, Any]],
) -> Path:
    """Write a checkpoint as a complete bundle: interventions, trainable weights, optimizer and RNG state."""
    optimizer_tensors, optimizer_groups = _optimizer_tensors(optimizer)
    tensors = {f"{WEIGHTS_PREFIX}{name}": tensor for name, tensor in trainable_weights(inner.model).items()}
    tensors.update(optimizer_tensors)
    tensors[RNG_KEY] = torch.get_rng_state()
    metadata = {"training": {"phase": phase, "step": step, "history": list(history), "optimizer_groups": optimizer_groups}}
    written = save_bundle(
        path,
        inner.intervention_list(),
        plugin=naming.plugin,
        method=naming.method,
        config=dict(naming.config),
        model=inner.model,
        tensors=tensors,
        metadata=metadata,
    )
    logger.info("checkpoint written: %s", written)
    return written


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> Bundle:
    """Load a checkpoint bundle written by :func:`fit`; raise :class:`ConfigError` if it is not one."""
    bundle = load_bundle(path, model)
    if "training" not in bundle.manifest.get("metadata", {}):
        raise ConfigError(f"{path} is a bundle but not a training checkpoint (no training state); give a file written with save_every")
    return bundle


# The trainer contract ------------------------------------------------------------------


@dataclass
class TrainInputs:
    """Inputs of a trainable method's ``train``.

    ``examples`` and ``eval_examples``, when given, replace the config's data files.
    """

    config: Any
    loaded: LoadedModel
    plugin: str | None = None
    progress: Progress = field(default_factory=LoggingProgress)
    examples: Sequence[Example] | None = None
    eval_examples: Sequence[Example] | None = None


@dataclass
class TrainResult:
    """Result of ``train``: the bundle contents, the evaluation and the measurements.

    ``main_process`` is False in the other processes of a multi-process run, which should
    neither save nor print.
    """

    interventions: list[Intervention] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: list[ReportTable] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    parameters: ParameterCount | None = None
    evaluation: Evaluation | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True


@dataclass(frozen=True)
class TrainableMethod:
    """A trainable method of a plugin, returned from the ``labhooks_trainers`` hook.

    ``config_class`` is a dataclass that subclasses :class:`TrainingConfig`, and ``train``
    turns :class:`TrainInputs` into a :class:`TrainResult`. Methods whose bundles contain
    model weights (``weights.*``) give ``apply_weights``: it puts a bundle's weights into
    the loaded model and returns the module to run, which ``labhooks generate`` uses.
    """

    name: str
    config_class: type
    train: Callable[[TrainInputs], TrainResult]
    summary: str
    apply_weights: Callable[[LoadedModel, Bundle], nn.Module] | None = None


def build_result(
    method: str,
    fitted: FitResult,
    parameters: ParameterCount,
    *,
    interventions: Sequence[Intervention] = (),
    tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    sample_rows: int = 8,
) -> TrainResult:
    """Collect a fit's evaluation, parameter count, step time and memory into a :class:`TrainResult`."""
    evaluation = fitted.final_evaluation
    metrics = {
        "accuracy": evaluation.accuracy if evaluation is not None else float("nan"),
        "eval_examples": float(evaluation.num_examples if evaluation is not None else 0),
        "trainable_parameters": float(parameters.trainable),
        "trainable_percent": parameters.percent,
        "seconds_per_step": fitted.seconds_per_step,
        "peak_memory_mb": fitted.peak_memory_mb,
        "final_loss": fitted.final_loss,
    }
    summary = ReportTable(
        f"evaluation of {method}",
        ["method", "accuracy", "examples", "trainable params", "% of base", "s/step", "peak MB", "final loss"],
        [
            [
                method,
                metrics["accuracy"],
                int(metrics["eval_examples"]),
                f"{parameters.trainable:,}",
                f"{parameters.percent:.3g}",
                fitted.seconds_per_step,
                round(fitted.peak_memory_mb),
                fitted.final_loss,
            ]
        ],
    )
    tables = [summary]
    if evaluation is not None and evaluation.rows:
        samples = [
            [prompt[:60], expected, output[:40], "yes" if correct else "no"]
            for prompt, expected, output, correct in evaluation.rows[:sample_rows]
        ]
        tables.append(ReportTable(f"sample generations of {method}", ["prompt", "expected", "generated", "correct"], samples))
    return TrainResult(
        interventions=list(interventions),
        tensors=dict(tensors or {}),
        tables=tables,
        metrics=metrics,
        metadata={"training": {"history": fitted.history, "steps": fitted.steps}, **dict(metadata or {})},
        parameters=parameters,
        evaluation=evaluation,
        history=fitted.history,
        main_process=fitted.main_process,
    )


def naming_for(inputs: TrainInputs, method: str) -> CheckpointNaming:
    """Return the checkpoint naming for a trainable method run."""
    return CheckpointNaming(inputs.plugin, method, config_to_dict(inputs.config))
