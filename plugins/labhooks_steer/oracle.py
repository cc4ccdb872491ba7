"""Oracle steering: how far activation steering can reproduce a fine-tuned model.

Given a base model and a fine-tuned model of the same architecture, the differences
Δh = h_fine-tuned − h_base at a site are recorded on some inputs. Replaying them
(:class:`OracleReplay`) gives the fine-tuned hidden states at that site exactly. The best
affine map from h_base to Δh, fitted by least squares (:class:`LinearMap`), shows how much
of that a linear steering function keeps. Both are scored per layer by the KL divergence
from the fine-tuned model's next-token distribution to the steered model's.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import labhooks
from labhooks.config import option
from labhooks.errors import BundleError, ConfigError
from labhooks.generation import format_prompt
from labhooks.intervention import FunctionIntervention, Intervention, InterventionContext
from labhooks.methods import MethodInputs, MethodResult, ReportTable
from labhooks.models import LoadedModel
from labhooks.resolve import ModelSites
from labhooks_steer.interventions import LinearMap, OracleReplay

logger = logging.getLogger(__name__)


@dataclass
class OracleConfig:
    """Options of oracle steering."""

    finetuned: str | None = option(
        None, "fine-tuned model: a folder, a hub id, or a bundle written by labhooks train (weights or interventions)"
    )
    data: str | None = option(
        None, "inputs: JSONL or CSV with prompt (and optional completion) fields, or a .txt file with one prompt per line"
    )
    site: str = option("post_block[*]", "sites scored one at a time")
    max_examples: int = option(16, "inputs read from data", unit="examples")
    max_tokens: int = option(64, "tokens per input (prompt with chat template, then completion)", unit="tokens")
    batch_size: int = option(8, "inputs per forward pass", unit="inputs")
    ridge: float = option(1e-3, "ridge term of the least-squares fit, relative to the mean squared base activation")
    system: str | None = option(None, "system message for the chat template")
    save_layer: int | None = option(None, "layer whose linear map goes in the bundle (None: the layer with the lowest KL)")

    def validate(self) -> None:
        if self.finetuned is None:
            raise ConfigError("missing finetuned=...: a fine-tuned model folder or id, or a bundle written by labhooks train")
        if self.data is None:
            raise ConfigError("missing data=FILE: prompts to record the hidden states on")
        for name in ("max_examples", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid value {getattr(self, name)} for {name}: must be >= 1")
        if self.ridge < 0:
            raise ConfigError(f"invalid value {self.ridge} for ridge: must be >= 0")


def read_texts(path: str | Path, system: str | None, tokenizer: Any, limit: int) -> list[str]:
    """Read inputs as full texts: the prompt in the chat template followed by the completion, if any."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"data file {str(source)!r} not found")
    records: list[dict[str, str]] = []
    if source.suffix == ".txt":
        records = [{"prompt": line.strip()} for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif source.suffix in (".jsonl", ".json"):
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{source}, line {number}: not valid JSON ({error})") from None
    elif source.suffix == ".csv":
        with source.open(encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle))
    else:
        raise ConfigError(f"data file {str(source)!r} must end in .txt, .jsonl or .csv")
    texts = []
    for record in records[:limit]:
        if "prompt" not in record:
            raise ConfigError(f"{source}: every record needs a prompt field")
        texts.append(format_prompt(tokenizer, record["prompt"], system) + record.get("completion", ""))
    if not texts:
        raise ConfigError(f"data file {str(source)!r} contains no inputs")
    return texts


def encode_right_padded(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Tokenize right-padded, so a column index is the absolute token position."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _scatter(gathered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    full = torch.zeros(*mask.shape, gathered.shape[-1], dtype=gathered.dtype)
    full[mask.bool()] = gathered
    return full


@torch.no_grad()
def record_states(model: nn.Module, batch: dict[str, torch.Tensor], site: str) -> dict[str, torch.Tensor]:
    """Return the hidden state of every real token at each concrete site, as (tokens, width) in row-major order."""
    with labhooks.record(model, site) as recorded:
        model(**batch)
    return {name: recorded[name] for name in recorded.sites()}


@torch.no_grad()
def replay_deltas(
    base: nn.Module, finetuned: nn.Module, batch: dict[str, torch.Tensor], site: str = "post_block[*]", chained: bool = False
) -> list[OracleReplay]:
    """Record Δh = h_fine-tuned − h_base at each concrete site and return one replay per site.

    With ``chained=False`` each Δh is taken against a clean base run, so a single replay
    gives the fine-tuned state at its site. With ``chained=True`` the base run replaces
    every site's state by the fine-tuned one as it goes, so each Δh is taken against a
    base block fed fine-tuned inputs. Attaching all these replays together reproduces the
    fine-tuned states at every site. Batches must be right-padded.
    """
    mask = batch["attention_mask"].bool()
    targets = record_states(finetuned, batch, site)
    if not chained:
        sources = record_states(base, batch, site)
    else:
        sources = {}
        replacers: list[Intervention] = []
        for name, target in targets.items():

            def replace(
                hidden: torch.Tensor, context: InterventionContext, name: str = name, target: torch.Tensor = target
            ) -> torch.Tensor:
                sources[name] = hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu()
                if context.row_index is None:
                    return target.reshape(hidden.shape).to(hidden.dtype)
                return target.to(hidden.device, hidden.dtype)

            replacers.append(FunctionIntervention(name, replace))
        with labhooks.attach(base, replacers):
            base(**batch)
    return [OracleReplay.from_deltas(name, _scatter(targets[name] - sources[name], mask)) for name in targets]


def fit_linear_map(site: str, base_states: torch.Tensor, deltas: torch.Tensor, ridge: float = 1e-3) -> LinearMap:
    """Fit Δh ≈ M·h + c by ridge least squares over tokens and return it as a :class:`LinearMap`.

    ``ridge`` is relative to the mean squared entry of ``base_states``.
    """
    inputs = torch.cat([base_states.double(), torch.ones(base_states.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = inputs.T @ inputs
    strength = ridge * float(base_states.double().pow(2).mean()) * inputs.shape[0]
    gram += strength * torch.eye(gram.shape[0], dtype=torch.float64)
    solution = torch.linalg.solve(gram, inputs.T @ deltas.double())
    width = base_states.shape[1]
    linear = LinearMap(site, width)
    with torch.no_grad():
        linear.weight.copy_(solution[:width].T.float())
        linear.bias.copy_(solution[width].float())
    return linear


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Return KL(reference ‖ other) of next-token distributions, averaged over real tokens."""
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    per_token = (reference.exp() * (reference - other)).sum(-1)
    # KL is never negative, but rounding leaves values like -1e-9 when the two agree.
    return max(0.0, float(per_token[mask.bool()].mean()))


def load_finetuned(loaded: LoadedModel, spec: str) -> tuple[nn.Module, labhooks.AttachHandle | None]:
    """Load the fine-tuned model: a model folder or id, or a copy of the base with a bundle applied."""
    from labhooks_steer.trainers import apply_trained_weights

    if spec.endswith(".safetensors"):
        copied = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name)
        bundle = labhooks.load_bundle(spec, copied.model)
        if bundle.interventions:
            return copied.model, labhooks.attach(copied.model, bundle.interventions)
        return apply_trained_weights(copied, bundle), None
    finetuned = labhooks.load_model(spec).model
    if getattr(finetuned.config, "model_type", None) != getattr(loaded.model.config, "model_type", None):
        raise BundleError(f"the fine-tuned model {spec!r} is not of the base model's architecture ({loaded.model.config.model_type})")
    return finetuned, None


def run_oracle(inputs: MethodInputs) -> MethodResult:
    """Score replayed and linear oracle steering per layer, and keep the best linear map."""
    config: OracleConfig = inputs.config
    if inputs.loaded is None:
        raise ConfigError("oracle steering needs a base model")
    loaded = inputs.loaded
    assert config.finetuned is not None and config.data is not None
    sites = [str(resolved.site) for resolved in ModelSites(loaded.model).resolve(config.site)]
    saved_site = None
    if config.save_layer is not None:
        chosen = [site for site in sites if f"[{config.save_layer}]" in site]
        if not chosen:
            raise ConfigError(f"save_layer={config.save_layer} is not among the scored sites {', '.join(sites)}")
        saved_site = chosen[0]
    texts = read_texts(config.data, config.system, loaded.tokenizer, config.max_examples)
    finetuned, handle = load_finetuned(loaded, config.finetuned)

    batches = [
        encode_right_padded(loaded.tokenizer, texts[start : start + config.batch_size], config.max_tokens)
        for start in range(0, len(texts), config.batch_size)
    ]
    base_states: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    deltas: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    replays: list[list[OracleReplay]] = []
    references: list[torch.Tensor] = []
    base_kl = []
    try:
        for batch in inputs.progress.track(batches, "recording", total=len(batches)):
            with torch.no_grad():
                references.append(finetuned(**batch).logits.float().cpu())
                base_kl.append(next_token_kl(references[-1], loaded.model(**batch).logits, batch["attention_mask"]))
            batch_replays = replay_deltas(loaded.model, finetuned, batch, config.site)
            replays.append(batch_replays)
            states = record_states(loaded.model, batch, config.site)
            mask = batch["attention_mask"].bool()
            for replay in batch_replays:
                name = str(replay.site)
                base_states[name].append(states[name])
                deltas[name].append(replay.delta[mask])
    finally:
        if handle is not None:
            handle.remove()

    rows = []
    maps: dict[str, LinearMap] = {}
    for index, site in enumerate(inputs.progress.track(sites, "scoring sites", total=len(sites))):
        linear = fit_linear_map(site, torch.cat(base_states[site]), torch.cat(deltas[site]), config.ridge)
        maps[site] = linear
        replay_kl, linear_kl = [], []
        for batch, batch_replays, reference in zip(batches, replays, references, strict=True):
            with torch.no_grad(), labhooks.attach(loaded.model, batch_replays[index]):
                replay_kl.append(next_token_kl(reference, loaded.model(**batch).logits, batch["attention_mask"]))
            with torch.no_grad(), labhooks.attach(loaded.model, linear):
                linear_kl.append(next_token_kl(reference, loaded.model(**batch).logits, batch["attention_mask"]))
        rows.append([site, sum(base_kl) / len(base_kl), sum(replay_kl) / len(replay_kl), sum(linear_kl) / len(linear_kl)])

    best = saved_site if saved_site is not None else min(rows, key=lambda row: row[3])[0]
    table = ReportTable(
        f"oracle steering: KL(fine-tuned ‖ steered) per site, {len(texts)} inputs",
        ["site", "unsteered KL", "replay KL", "linear map KL"],
        rows,
    )
    metrics = {"unsteered_kl": rows[0][1], "best_linear_kl": min(row[3] for row in rows), "best_replay_kl": min(row[2] for row in rows)}
    metadata = {"oracle": {"sites": sites, "kl": {row[0]: {"replay": row[2], "linear": row[3]} for row in rows}, "saved_site": best}}
    logger.info("oracle steering: best linear map at %s", best)
    return MethodResult(interventions=[maps[best]], tables=[table], metrics=metrics, metadata=metadata)
