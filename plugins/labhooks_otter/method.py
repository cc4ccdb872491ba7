"""The ``otter`` plugin's methods: rebalance a prediction file, fit R-OTTER, debias multiple choice.

* ``rebalance`` (no model): OTTER on a file of scores, with prior matching for comparison.
* ``rotter`` (a text encoder): zero-shot classification of a data file, OTTER on a
  validation split, R-OTTER log-weights fitted to OTTER's predictions. The bundle contains a
  :class:`RotterReweight` for the classifier's ``logits`` site.
* ``mcq`` (a causal language model): letter scores on multiple-choice questions, OTTER
  with a uniform target over answer positions; the bundle contains an :class:`OtterRebalance`
  (or, with ``online=true``, a :class:`RotterReweight`) for the model's ``logits`` site.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from labhooks.config import option
from labhooks.errors import ConfigError
from labhooks.methods import Method, MethodInputs, MethodResult, ReportTable
from labhooks.zeroshot import TextDataConfig, accuracy, read_labeled_texts, read_records
from labhooks_otter.interventions import OtterRebalance, RotterReweight
from labhooks_otter.questions import LETTERS, letter_token_ids, option_scores, read_questions
from labhooks_otter.transport import (
    SCORE_KINDS,
    SOLVERS,
    estimate_bbse,
    estimate_mlls,
    fit_rotter,
    label_distribution,
    log_probabilities,
    otter_predict,
    prior_matching,
)

logger = logging.getLogger(__name__)

TARGET_HELP = (
    "target label distribution: uniform, K comma-separated weights, bbse or mlls (estimated with labeled=FILE), "
    "or labels (the label frequencies of the data, an oracle for experiments)"
)


def _check_target_option(target: str, labeled: str | None) -> None:
    lowered = target.strip().lower()
    if lowered in ("bbse", "mlls") and labeled is None:
        raise ConfigError(f"target={lowered} needs labeled=FILE: examples with labels from the source distribution")
    if lowered not in ("uniform", "bbse", "mlls", "labels"):
        try:
            [float(item) for item in target.split(",")]
        except ValueError:
            raise ConfigError(f"invalid target {target!r}: {TARGET_HELP}") from None


def _check_solver_options(solver: str, reg: float, max_iterations: int) -> None:
    if solver not in SOLVERS:
        raise ConfigError(f"invalid solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if solver != "emd" and reg <= 0:
        raise ConfigError(f"reg must be > 0 for solver={solver}, got {reg}")
    if max_iterations < 1:
        raise ConfigError(f"max_iterations must be >= 1, got {max_iterations}")


def parse_target(text: str, num_classes: int) -> torch.Tensor | str:
    """Return the target as a distribution, or the name of the estimator ("bbse", "mlls", "labels")."""
    lowered = text.strip().lower()
    if lowered == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes)
    if lowered in ("bbse", "mlls", "labels"):
        return lowered
    try:
        values = torch.tensor([float(item) for item in text.split(",")])
    except ValueError:
        raise ConfigError(f"invalid target {text!r}: {TARGET_HELP}") from None
    if values.numel() != num_classes or (values < 0).any() or float(values.sum()) <= 0:
        raise ConfigError(f"invalid target {text!r}: give {num_classes} non-negative weights with a positive sum")
    return values / values.sum()


def distribution_row(name: str, values: torch.Tensor) -> list[object]:
    return [name, *[round(100 * float(value), 1) for value in values]]


def percent(value: float) -> float:
    return round(100 * value, 2)


# rebalance -------------------------------------------------------------------------------


@dataclass
class RebalanceConfig:
    """Options of ``labhooks apply plugin=otter method=rebalance``."""

    data: str = option("", "prediction file: JSONL or JSON records with a list of class scores, .npy (inputs, classes), or CSV")
    scores: str = option("logits", "what the scores are", choices=SCORE_KINDS)
    target: str = option("uniform", TARGET_HELP)
    labeled: str | None = option(None, "file of labeled scores from the source distribution, for target=bbse or mlls")
    score_field: str = option(
        "scores", "field of a JSONL, JSON or CSV record that contains the scores (CSV: a prefix of the score columns)"
    )
    label_field: str = option("label", "field that contains the true class index, if any")
    solver: str = option("emd", "transport solver: exact EMD or entropic Sinkhorn", choices=SOLVERS)
    reg: float = option(0.05, "entropic regularisation of the Sinkhorn solvers, in nats of the cost -log p")
    max_iterations: int = option(1000, "iteration limit of the Sinkhorn solvers")
    output: str | None = option(None, "JSONL file to write the rebalanced prediction of each input to")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("missing data=FILE: a prediction file with one row of class scores per input")
        _check_target_option(self.target, self.labeled)
        _check_solver_options(self.solver, self.reg, self.max_iterations)


def read_scores(path: str | Path, score_field: str = "scores", label_field: str = "label") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read class scores (inputs, classes) and optional integer labels from a prediction file."""
    source = Path(path)
    if source.suffix.lower() == ".npy":
        if not source.is_file():
            raise ConfigError(f"prediction file {str(source)!r} not found")
        array = np.load(source, allow_pickle=False)
        if array.ndim != 2:
            raise ConfigError(f"{source} contains an array of shape {array.shape}; expected (inputs, classes)")
        return torch.from_numpy(array.astype(np.float64)), None

    records = read_records(source)
    rows = []
    for number, record in enumerate(records, start=1):
        value = record.get(score_field)
        if value is None and source.suffix.lower() == ".csv":
            columns = sorted((key for key in record if key.startswith(score_field)), key=lambda key: (len(key), key))
            value = [record[key] for key in columns]
        if isinstance(value, str):
            value = value.split(",")
        try:
            rows.append([float(item) for item in value])  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: record {number} has no list of numbers in {score_field!r}; set score_field=") from None
    if len({len(row) for row in rows}) != 1 or len(rows[0]) < 2:
        raise ConfigError(f"{source}: every record must have the same number (at least two) of class scores")
    labels = None
    if all(record.get(label_field) not in (None, "") for record in records):
        try:
            labels = torch.tensor([int(record[label_field]) for record in records])
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: the {label_field!r} field must contain class indices") from None
    return torch.tensor(rows, dtype=torch.float64), labels


def _estimate_target(
    target: torch.Tensor | str,
    num_classes: int,
    target_scores: torch.Tensor,
    kind: str,
    labeled: str | None,
    labels: torch.Tensor | None,
    label_field: str,
    score_field: str,
) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        return target
    if target == "labels":
        if labels is None:
            raise ConfigError("target=labels needs labels in the data file")
        return label_distribution(labels, num_classes)
    if labeled is None:
        raise ConfigError(f"target={target} needs labeled=FILE: scores with labels from the source distribution")
    labeled_scores, labeled_labels = read_scores(labeled, score_field, label_field)
    if labeled_labels is None:
        raise ConfigError(f"{labeled} has no {label_field!r} field; target={target} needs labeled examples")
    if target == "bbse":
        return estimate_bbse(labeled_scores.argmax(-1), labeled_labels, target_scores.argmax(-1), num_classes)
    return estimate_mlls(labeled_scores, labeled_labels, target_scores, kind=kind)


def run_rebalance(inputs: MethodInputs) -> MethodResult:
    """Rebalance a prediction file to a target distribution with OTTER."""
    config: RebalanceConfig = inputs.config
    scores, labels = read_scores(config.data, config.score_field, config.label_field)
    num_classes = scores.shape[1]
    target = _estimate_target(
        parse_target(config.target, num_classes),
        num_classes,
        scores,
        config.scores,
        config.labeled,
        labels,
        config.label_field,
        config.score_field,
    )
    before = log_probabilities(scores, config.scores).argmax(-1)
    matched, _ = prior_matching(scores, target, kind=config.scores)
    after = otter_predict(scores, target, kind=config.scores, solver=config.solver, reg=config.reg, max_iterations=config.max_iterations)

    classes = [str(index) for index in range(num_classes)]
    rows = [
        distribution_row("target", target),
        distribution_row("zero-shot predictions", label_distribution(before, num_classes)),
        distribution_row("prior matching", label_distribution(matched, num_classes)),
        distribution_row("OTTER", label_distribution(after, num_classes)),
    ]
    if labels is not None:
        rows.insert(1, distribution_row("true labels", label_distribution(labels, num_classes)))
    tables = [ReportTable(f"class distribution of {len(scores)} predictions (%)", ["", *classes], rows)]
    metrics = {"inputs": float(len(scores)), "changed_predictions": float((before != after).sum())}
    if labels is not None:
        results = {"zero-shot": before, "prior matching": matched, "OTTER": after}
        tables.append(
            ReportTable(
                "accuracy (%)", ["predictions", "accuracy %"], [[name, percent(accuracy(value, labels))] for name, value in results.items()]
            )
        )
        metrics.update(
            {
                f"accuracy_{name.replace(' ', '_').replace('-', '_').lower()}": percent(accuracy(value, labels))
                for name, value in results.items()
            }
        )

    if config.output:
        path = Path(config.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"index": index, "prediction": int(new), "zero_shot": int(old)})
            for index, (new, old) in enumerate(zip(after, before, strict=True))
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        logger.info("wrote %d rebalanced predictions to %s", len(lines), path)
    return MethodResult(tensors={"predictions": after, "target": target.float()}, tables=tables, metrics=metrics)


# rotter ----------------------------------------------------------------------------------


@dataclass
class RotterConfig(TextDataConfig):
    """Options of ``labhooks apply plugin=otter method=rotter``."""

    data: str = option("", "JSONL, JSON or CSV file of inputs from the target distribution: a text field and an optional label field")
    target: str = option("uniform", TARGET_HELP)
    labeled: str | None = option(None, "file of labeled texts from the source distribution, for target=bbse or mlls")
    validation_fraction: float = option(0.5, "share of the data OTTER and R-OTTER are fitted on; the rest is the test split (when labeled)")
    solver: str = option("emd", "transport solver: exact EMD or entropic Sinkhorn", choices=SOLVERS)
    reg: float = option(0.05, "entropic regularisation of the Sinkhorn solvers, in nats of the cost -log p")
    max_iterations: int = option(1000, "iteration limit of the Sinkhorn solvers")
    l2: float = option(1e-4, "L2 penalty on the R-OTTER log-weights")
    seed: int = option(0, "seed of the validation/test split")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.validation_fraction <= 1:
            raise ConfigError(f"validation_fraction must be in (0, 1], got {self.validation_fraction}")
        _check_target_option(self.target, self.labeled)
        _check_solver_options(self.solver, self.reg, self.max_iterations)


def run_rotter(inputs: MethodInputs) -> MethodResult:
    """Fit R-OTTER log-weights for a zero-shot text classifier and compare with OTTER and prior matching."""
    config: RotterConfig = inputs.config
    if inputs.loaded is None:
        raise ConfigError("rotter needs an encoder model (model=..., default all-MiniLM-L6-v2)")
    data = config.read_data()
    classifier = config.classifier(inputs.loaded)
    num_classes = classifier.num_classes
    logits = classifier.predict_logits(data.texts, config.batch_size, inputs.progress, "classifying")

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    size = (
        len(data) if data.labels is None or config.validation_fraction == 1 else max(1, int(round(config.validation_fraction * len(data))))
    )
    validation, test = order[:size], order[size:]
    if len(test) == 0:
        test = validation
        logger.info("no held-out split: reporting on the validation inputs themselves")

    target = parse_target(config.target, num_classes)
    if isinstance(target, str):
        if target == "labels":
            if data.labels is None:
                raise ConfigError("target=labels needs labels in the data file")
            target = label_distribution(data.labels[validation], num_classes)
        else:
            if config.labeled is None:
                raise ConfigError(f"target={target} needs labeled=FILE: labeled texts from the source distribution")
            labeled = read_labeled_texts(config.labeled, config.classes, config.text_field, config.label_field, None)
            if labeled.labels is None:
                raise ConfigError(f"{config.labeled} has no {config.label_field!r} field; target={target} needs labels")
            labeled_logits = classifier.predict_logits(labeled.texts, config.batch_size, inputs.progress, "classifying labeled")
            if target == "bbse":
                target = estimate_bbse(labeled_logits.argmax(-1), labeled.labels, logits[validation].argmax(-1), num_classes)
            else:
                target = estimate_mlls(labeled_logits, labeled.labels, logits[validation])

    pseudo_labels = otter_predict(logits[validation], target, solver=config.solver, reg=config.reg, max_iterations=config.max_iterations)
    log_weights = fit_rotter(logits[validation], pseudo_labels, l2=config.l2)
    intervention = RotterReweight("logits", log_weights)
    agreement = accuracy((logits[validation] + log_weights).argmax(-1), pseudo_labels)

    test_logits = logits[test]
    results = {
        "zero-shot": test_logits.argmax(-1),
        "prior matching": prior_matching(test_logits, target)[0],
        "OTTER (test batch)": otter_predict(
            test_logits, target, solver=config.solver, reg=config.reg, max_iterations=config.max_iterations
        ),
        "R-OTTER (online)": (test_logits + log_weights).argmax(-1),
    }
    tables = [
        ReportTable(
            "R-OTTER log-weights (added to the class logits)",
            ["class", "target %", "log-weight"],
            [
                [name, round(100 * float(target[index]), 1), round(float(log_weights[index]), 4)]
                for index, name in enumerate(config.classes)
            ],
        )
    ]
    distribution_rows = [distribution_row(name, label_distribution(value, num_classes)) for name, value in results.items()]
    distribution_rows.insert(0, distribution_row("target", target))
    tables.append(ReportTable(f"class distribution on {len(test)} test inputs (%)", ["", *config.classes], distribution_rows))
    metrics = {
        "validation_inputs": float(len(validation)),
        "test_inputs": float(len(test)),
        "rotter_agreement_with_otter": percent(agreement),
    }
    if data.labels is not None:
        labels = data.labels[test]
        tables.append(
            ReportTable(
                "accuracy on the test split (%)",
                ["predictions", "accuracy %"],
                [[name, percent(accuracy(value, labels))] for name, value in results.items()],
            )
        )
        for name, value in results.items():
            key = name.split(" (")[0].replace(" ", "_").replace("-", "_").lower()
            metrics[f"accuracy_{key}"] = percent(accuracy(value, labels))
    metadata = {"zeroshot": classifier.metadata(), "target": [float(value) for value in target]}
    return MethodResult(interventions=[intervention], tensors={"target": target.float()}, tables=tables, metrics=metrics, metadata=metadata)


# mcq -------------------------------------------------------------------------------------


@dataclass
class McqConfig:
    """Options of ``labhooks apply plugin=otter method=mcq``."""

    questions: str | None = option(None, "JSONL file of multiple-choice questions (default: the packaged arithmetic set)")
    limit: int | None = option(200, "use only the first N questions (none for all)", unit="questions")
    online: bool = option(False, "write R-OTTER log-weights (one question at a time) instead of the batch OTTER intervention")
    solver: str = option("emd", "transport solver: exact EMD or entropic Sinkhorn", choices=SOLVERS)
    reg: float = option(0.05, "entropic regularisation of the Sinkhorn solvers, in nats of the cost -log p")
    max_iterations: int = option(1000, "iteration limit of the Sinkhorn solvers")
    batch_size: int = option(16, "questions per forward pass", unit="questions")

    def validate(self) -> None:
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"limit must be >= 2 (OTTER rebalances a batch), got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        _check_solver_options(self.solver, self.reg, self.max_iterations)


def run_mcq(inputs: MethodInputs) -> MethodResult:
    """Measure and remove a language model's answer-position bias on multiple-choice questions."""
    config: McqConfig = inputs.config
    if inputs.loaded is None:
        raise ConfigError("mcq needs a causal language model (model=..., default the embedded SmolLM2-135M-Instruct)")
    records = read_questions(config.questions)
    if config.limit is not None:
        records = records[: config.limit]
    num_options = len(records[0]["options"])
    letters = list(LETTERS[:num_options])
    scores = option_scores(inputs.loaded, records, config.batch_size, inputs.progress)
    uniform = torch.full((num_options,), 1.0 / num_options)

    before = scores.argmax(-1)
    after = otter_predict(scores, uniform, solver=config.solver, reg=config.reg, max_iterations=config.max_iterations)
    log_weights = fit_rotter(scores, after)
    online = (scores + log_weights).argmax(-1)
    results = {"zero-shot": before, "OTTER (uniform target)": after, "R-OTTER (online, fitted on the same questions)": online}

    rows = [distribution_row(name, label_distribution(value, num_options)) for name, value in results.items()]
    tables = []
    metrics = {"questions": float(len(records)), "rotter_agreement_with_otter": percent(accuracy(online, after))}
    if all("answer" in record for record in records):
        labels = torch.tensor([int(record["answer"]) for record in records])
        rows.insert(0, distribution_row("correct answers", label_distribution(labels, num_options)))
        tables.append(
            ReportTable(
                "accuracy (%)", ["predictions", "accuracy %"], [[name, percent(accuracy(value, labels))] for name, value in results.items()]
            )
        )
        metrics.update(
            {
                "accuracy_before": percent(accuracy(before, labels)),
                "accuracy_otter": percent(accuracy(after, labels)),
                "accuracy_rotter": percent(accuracy(online, labels)),
            }
        )
    tables.insert(0, ReportTable(f"answer-position distribution on {len(records)} questions (%)", ["", *letters], rows))

    ids = letter_token_ids(inputs.loaded.tokenizer, num_options)
    if config.online:
        intervention = RotterReweight("logits", log_weights, class_indices=ids)
    else:
        intervention = OtterRebalance(
            "logits",
            uniform,
            solver=config.solver,
            reg=config.reg,
            max_iterations=config.max_iterations,
            class_indices=ids,
            positions="last_prompt",
        )
    metadata = {"letters": letters, "letter_token_ids": ids}
    return MethodResult(interventions=[intervention], tables=tables, metrics=metrics, metadata=metadata)


REBALANCE_METHOD = Method(
    name="rebalance",
    config_class=RebalanceConfig,
    run=run_rebalance,
    summary="Rebalance a file of class scores to a target label distribution with OTTER (optimal transport).",
    model_kind="none",
)
ROTTER_METHOD = Method(
    name="rotter",
    config_class=RotterConfig,
    run=run_rotter,
    summary="Fit R-OTTER class log-weights for a zero-shot text classifier, for online label-shift correction.",
    model_kind="encoder",
)
MCQ_METHOD = Method(
    name="mcq",
    config_class=McqConfig,
    run=run_mcq,
    summary="Measure and remove a language model's answer-position bias on multiple-choice questions with OTTER.",
    model_kind="causal_lm",
)
