"""``labhooks aggregate``: fit a label model on a label matrix and write labels and probabilities."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from rich.table import Table

import labhooks
from labhooks.aggregators import ABSTAIN, Aggregator, LabelMatrixError, MetricSpaceAggregator
from labhooks.errors import ConfigError, PluginError
from labhooks.methods import ReportTable
from labhooks_cli.arguments import ParsedArguments
from labhooks_cli.console import console, print_config_options, render_table

_COMMON_OPTIONS = ("method", "data", "cardinality", "class_balance", "distances", "out", "bundle", "tie_break")
_USAGE = (
    "labhooks aggregate method=NAME data=L.npy|L.csv [cardinality=K] [class_balance=P0,P1,...] [out=FILE.csv|FILE.npz] "
    "[bundle=FILE.safetensors] [tie_break=random|abstain] [key=value ...]"
)


def _aggregator_class(name: str) -> type[Aggregator]:
    found = labhooks.get_registry().aggregator(name)
    if not (isinstance(found, type) and issubclass(found, Aggregator)):
        raise PluginError(f"the aggregator {name!r} ({found!r}) does not subclass labhooks.aggregators.Aggregator; its plugin is broken")
    return found


def _print_help(method: type[Aggregator] | None) -> None:
    console.print(_USAGE, markup=False)
    console.print(
        "The label matrix has one row per example and one column per source; labels are 0 .. K-1 and -1 means abstain. "
        "CSV files may have a header row. Writes each example's label and class probabilities (default FILE: DATA-METHOD.csv) "
        "and prints the estimated source accuracies; bundle= also saves the fitted label model. "
        "Rows whose most probable classes tie get one of them at random (seeded by seed=) or, with tie_break=abstain, -1."
    )
    registry = labhooks.get_registry()
    if method is None:
        table = Table(title="label models (method=...)")
        table.add_column("method")
        table.add_column("summary", overflow="fold")
        for name, aggregator in sorted(registry.aggregators.items()):
            table.add_row(name, getattr(aggregator, "summary", ""))
        console.print(table)
        console.print("Options of one method: labhooks aggregate method=NAME --help")
        return
    console.print(f"[bold]method={method.name}[/]  {method.summary}")
    if issubclass(method, MetricSpaceAggregator):
        console.print("This method needs distances=D.npy|D.csv: the (K x K) distance matrix of the label space.")
    print_config_options(f"options of {method.name}", method.config_class)


def _diagnose_csv(path: Path, delimiter: str | None, skip: int) -> str:
    """Return a message naming the first cell of a CSV file that is not a number."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    width = None
    for row_index, line in enumerate(lines[skip:], start=skip + 1):
        if not line.strip():
            continue
        cells = line.split(delimiter) if delimiter else line.split()
        if width is None:
            width = len(cells)
        elif len(cells) != width:
            return f"line {row_index} has {len(cells)} values but the first data line has {width}"
        for column_index, cell in enumerate(cells, start=1):
            if not cell.strip():
                return f"line {row_index}, column {column_index} is empty; write -1 for abstain"
            try:
                float(cell)
            except ValueError:
                return f"line {row_index}, column {column_index} holds {cell.strip()!r}, which is not a number"
    return "the file holds no rows of numbers"


def _read_csv(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8", newline="") as handle:
        first = handle.readline()
    if not first.strip():
        raise LabelMatrixError(f"{path} is empty; give one row per example and one column per source")
    delimiter: str | None = None
    if "," in first:
        delimiter = ","
    elif "\t" in first:
        delimiter = "\t"
    header = not all(_is_number(cell) for cell in (first.split(delimiter) if delimiter else first.split()))
    skip = 1 if header else 0
    try:
        return np.loadtxt(path, delimiter=delimiter, skiprows=skip, ndmin=2)
    except ValueError:
        raise LabelMatrixError(f"cannot read {path}: {_diagnose_csv(path, delimiter, skip)}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_matrix(text: str, what: str) -> np.ndarray:
    """Read a ``.npy`` or CSV (``.csv``, ``.tsv``, ``.txt``) matrix file."""
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{what} file {text!r} not found")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise LabelMatrixError(f"cannot read {path} as a .npy array: {error}") from None
    if path.suffix in (".csv", ".tsv", ".txt"):
        return _read_csv(path)
    raise ConfigError(f"{what} file {text!r} must end in .npy, .csv, .tsv or .txt")


def _parse_cardinality(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"invalid value {text!r} for cardinality: expected an integer (the number of classes)") from None
    if value < 2:
        raise ConfigError(f"invalid value {value} for cardinality: must be at least 2")
    return value


def _parse_balance(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"invalid value {text!r} for class_balance: expected comma-separated proportions, for example 0.3,0.7") from None


def _write_labels(target: Path, labels: np.ndarray, probabilities: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".npz":
        np.savez(target, labels=labels, probabilities=probabilities)
        return
    with open(target, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", *(f"p_{label}" for label in range(probabilities.shape[1]))])
        for label, row in zip(labels, probabilities, strict=True):
            writer.writerow([int(label), *(f"{value:.6g}" for value in row)])


def run_aggregate(arguments: ParsedArguments) -> None:
    method_name = arguments.pop("method")
    registry = labhooks.get_registry()
    method = _aggregator_class(method_name) if method_name is not None else None
    if arguments.help:
        _print_help(method)
        return
    if method is None:
        known = ", ".join(sorted(registry.aggregators)) or "none"
        raise ConfigError(f"missing method=...; for example: labhooks aggregate method=flyingsquid data=L.npy (methods: {known})")

    data = arguments.pop("data") or (arguments.positional.pop(0) if arguments.positional else None)
    if data is None:
        raise ConfigError(f"missing data=FILE; for example: labhooks aggregate method={method.name} data=L.npy")
    if arguments.positional:
        raise ConfigError(f"unexpected argument(s) {' '.join(arguments.positional)}: options take the form key=value")
    cardinality = _parse_cardinality(arguments.pop("cardinality"))
    class_balance = _parse_balance(arguments.pop("class_balance"))
    distances_file = arguments.pop("distances")
    out = arguments.pop("out")
    bundle = arguments.pop("bundle")
    if out is not None and Path(out).suffix not in (".csv", ".npz"):
        raise ConfigError(f"out={out} must end in .csv or .npz")
    tie_break = arguments.pop("tie_break") or "random"
    if tie_break not in ("random", "abstain"):
        raise ConfigError(f"invalid value {tie_break!r} for tie_break: choose random or abstain")

    try:
        if issubclass(method, MetricSpaceAggregator):
            if distances_file is None:
                raise ConfigError(f"method {method.name} needs distances=D.npy|D.csv: the distance matrix of the label space")
            aggregator: Aggregator = method(read_matrix(distances_file, "distances"), **arguments.options)
        else:
            if distances_file is not None:
                raise ConfigError(f"method {method.name} uses no distance matrix; remove distances={distances_file}")
            aggregator = method(**arguments.options)
    except ConfigError as error:
        raise ConfigError(f"{error} (common options: {', '.join(_COMMON_OPTIONS)})") from None

    matrix = read_matrix(data, "data")
    with console.status(f"fitting {method.name}"):
        aggregator.fit(matrix, cardinality=cardinality, class_balance=class_balance)
        probabilities = aggregator.predict_proba(matrix)
        labels = aggregator.predict(matrix, tie_break="abstain" if tie_break == "abstain" else "random")

    target = Path(out) if out else Path(f"{Path(data).stem}-{method.name}.csv")
    _write_labels(target, labels, probabilities)

    assert aggregator.coverage is not None and aggregator.class_balance is not None
    rows = [
        [source, float(coverage), float(accuracy)]
        for source, (coverage, accuracy) in enumerate(zip(aggregator.coverage, aggregator.accuracies, strict=True))
    ]
    console.print(f"{method.name}: estimated source accuracies (coverage = fraction of examples the source labels)")
    console.print(render_table(ReportTable("", ["source", "coverage", "accuracy"], rows)))
    balance = ", ".join(f"{value:.4g}" for value in aggregator.class_balance)
    console.print(f"class balance: {balance}")
    abstained = int(np.count_nonzero(labels == ABSTAIN))
    note = f", {abstained} tied rows abstained" if abstained else ""
    console.print(f"labels written: [bold]{target}[/] ({labels.shape[0]} examples, {aggregator.cardinality} classes{note})")
    if bundle is not None:
        saved = aggregator.save(bundle)
        console.print(f"label model written: [bold]{saved}[/]")
