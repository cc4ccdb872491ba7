"""The ``roboshot`` method: insight directions for a zero-shot text classifier, with a before/after report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from labhooks.config import option
from labhooks.errors import ConfigError
from labhooks.methods import Method, MethodInputs, MethodResult, ReportTable
from labhooks.models import load_model
from labhooks.zeroshot import TextDataConfig, ZeroShotClassifier, accuracy, group_accuracy
from labhooks_roboshot.insights import InsightPair, generate_insights, read_insights_file
from labhooks_roboshot.projection import MODES, RoboShotProjection

logger = logging.getLogger(__name__)


@dataclass
class RoboShotConfig(TextDataConfig):
    """Options of ``labhooks apply plugin=roboshot``."""

    data: str = option("", "JSONL, JSON or CSV file of inputs: a text field, and optional label and group fields")
    task: str = option("", "one-sentence description of the task, given to the language model when insights=lm")
    insights: str = option("lm", "where insight pairs come from: lm (ask the language model) or a .txt or .json file")
    insight_model: str | None = option(None, "language model for insights=lm (default: the embedded SmolLM2-135M-Instruct)")
    num_insights: int = option(3, "insight pairs kept at most from each language model output", unit="pairs")
    attempts: int = option(3, "generations per prompt before an unparseable answer is an error (the first greedy, then sampled)")
    max_new_tokens: int = option(96, "token budget of each language model answer", unit="tokens")
    mode: str = option("both", "reject harmful directions, amplify helpful ones, or both", choices=MODES)
    orthonormalize: bool = option(False, "replace each direction set by an orthonormal basis of its span (QR) first")
    renormalize: bool = option(False, "rescale the embedding to unit norm after each step (no effect on cosine predictions)")
    group_field: str = option("group", "field that contains the group, for worst-group accuracy")
    seed: int = option(0, "seed of the sampled insight retries")

    def validate(self) -> None:
        super().validate()
        if self.insights == "lm" and not self.task.strip():
            raise ConfigError('insights=lm needs task="..." (one sentence describing the task), or pass insights=FILE')
        for name in ("num_insights", "attempts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def collect_insights(config: RoboShotConfig, inputs: MethodInputs) -> list[InsightPair]:
    """Return the insight pairs from the configured file or language model."""
    if config.insights != "lm":
        return read_insights_file(Path(config.insights))
    logger.info("asking %s for insight pairs", config.insight_model or "the embedded language model")
    language_model = load_model(config.insight_model)
    kinds = {"reject": ("harmful",), "amplify": ("helpful",), "both": ("harmful", "helpful")}[config.mode]
    return generate_insights(
        language_model,
        config.task,
        config.classes,
        kinds=kinds,
        count=config.num_insights,
        attempts=config.attempts,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        progress=inputs.progress,
    )


def insight_directions(classifier: ZeroShotClassifier, pairs: list[InsightPair], kind: str) -> torch.Tensor:
    """Return the (count, width) directions of one kind: first text's embedding minus second's."""
    chosen = [pair for pair in pairs if pair.kind == kind]
    if not chosen:
        return torch.zeros(0, classifier.head.in_features)
    first = classifier.embed_texts([pair.first for pair in chosen])
    second = classifier.embed_texts([pair.second for pair in chosen])
    directions = first - second
    norms = directions.norm(dim=-1)
    keep = norms > 1e-6 * norms.max().clamp_min(1e-30)
    for pair, is_kept in zip(chosen, keep.tolist(), strict=True):
        if not is_kept:
            logger.warning("dropping the %s insight %r: its two texts have the same embedding", kind, pair.as_line())
    return directions[keep]


def _score_rows(title: str, predictions: torch.Tensor, labels: torch.Tensor, groups: list[str] | None) -> list[object]:
    if groups is None:
        return [title, round(100 * accuracy(predictions, labels), 2)]
    return [title, *group_accuracy(predictions, labels, groups).as_row()]


def run_roboshot(inputs: MethodInputs) -> MethodResult:
    """Fit RoboShot directions on a text encoder and report zero-shot accuracy before and after."""
    config: RoboShotConfig = inputs.config
    if inputs.loaded is None:
        raise ConfigError("roboshot needs an encoder model (model=..., default all-MiniLM-L6-v2)")
    data = config.read_data(config.group_field)
    classifier = config.classifier(inputs.loaded)

    pairs = collect_insights(config, inputs)
    harmful = insight_directions(classifier, pairs, "harmful")
    helpful = insight_directions(classifier, pairs, "helpful")
    intervention = RoboShotProjection(
        "embeddings", harmful, helpful, mode=config.mode, orthonormalize=config.orthonormalize, renormalize=config.renormalize
    )

    embeddings = classifier.predict_embeddings(data.texts, config.batch_size, inputs.progress, "embedding inputs")
    with torch.no_grad():
        before = classifier.head(embeddings).argmax(-1)
        after = classifier.head(intervention.project(embeddings)).argmax(-1)

    tables = [
        ReportTable(
            "insight pairs (direction = embedding of the first text minus the second)",
            ["kind", "concept", "first text", "second text"],
            [[pair.kind, pair.concept, pair.first, pair.second] for pair in pairs],
        )
    ]
    metrics: dict[str, float] = {
        "harmful_directions": float(intervention.harmful.shape[0]),
        "helpful_directions": float(intervention.helpful.shape[0]),
    }
    changed = int((before != after).sum())
    metrics["changed_predictions"] = float(changed)
    if data.labels is not None:
        rows = [_score_rows("zero-shot", before, data.labels, data.groups), _score_rows("RoboShot", after, data.labels, data.groups)]
        names = ["avg", "wg", "gap"] if data.groups is not None else ["accuracy"]
        columns = ["classifier", "AVG %", "WG %", "Gap"] if data.groups is not None else ["classifier", "accuracy %"]
        tables.append(ReportTable(f"zero-shot accuracy on {len(data)} inputs, before and after RoboShot", columns, rows))
        for prefix, row in zip(("before", "after"), rows, strict=True):
            metrics.update({f"{prefix}_{name}": float(value) for name, value in zip(names, row[1:], strict=True)})  # type: ignore[arg-type]
        if data.groups is not None:
            per_before = group_accuracy(before, data.labels, data.groups)
            per_after = group_accuracy(after, data.labels, data.groups)
            tables.append(
                ReportTable(
                    "accuracy per group (%)",
                    ["group", "inputs", "zero-shot", "RoboShot"],
                    [
                        [
                            name,
                            per_before.counts[name],
                            round(100 * per_before.per_group[name], 2),
                            round(100 * per_after.per_group[name], 2),
                        ]
                        for name in per_before.per_group
                    ],
                )
            )
    else:
        logger.warning("the data file has no %r field, so only the number of changed predictions is reported", config.label_field)

    metadata = {
        "zeroshot": classifier.metadata(),
        "insights": [{"kind": pair.kind, "concept": pair.concept, "texts": [pair.first, pair.second]} for pair in pairs],
    }
    return MethodResult(interventions=[intervention], tables=tables, metrics=metrics, metadata=metadata)


ROBOSHOT_METHOD = Method(
    name="roboshot",
    config_class=RoboShotConfig,
    run=run_roboshot,
    summary="Reject spurious and amplify true insight directions in a zero-shot classifier's embeddings.",
    model_kind="encoder",
)
