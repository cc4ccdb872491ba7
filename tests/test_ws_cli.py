"""``labhooks aggregate``: outputs, bundles, help and one-line errors with exit status 2."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from labhooks.aggregators import Aggregator
from labhooks_cli.main import app
from labhooks_ws.simulate import simulate_label_matrix, simulate_metric_sources, spider_metric

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from labhooks_cli import console

    monkeypatch.setattr(console.console, "width", 200)
    monkeypatch.setattr(console.error_console, "width", 200)


@pytest.fixture
def label_files(tmp_path):
    matrix, truth = simulate_label_matrix(800, [0.9, 0.8, 0.7, 0.65], cardinality=3, coverage=[0.9, 0.9, 1.0, 0.8], seed=0)
    npy = tmp_path / "L.npy"
    np.save(npy, matrix)
    with_header = tmp_path / "L.csv"
    np.savetxt(with_header, matrix, fmt="%d", delimiter=",", header="lf_a,lf_b,lf_c,lf_d", comments="")
    return npy, with_header, matrix, truth


def _read_output(path):
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    labels = np.array([int(row[0]) for row in body])
    probabilities = np.array([[float(value) for value in row[1:]] for row in body])
    return header, labels, probabilities


def test_aggregate_npy_writes_labels(label_files, tmp_path):
    npy, _, matrix, truth = label_files
    out = tmp_path / "labels.csv"
    result = runner.invoke(app, ["aggregate", "method=flyingsquid", f"data={npy}", f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "estimated source accuracies" in result.output
    assert "class balance:" in result.output
    header, labels, probabilities = _read_output(out)
    assert header == ["label", "p_0", "p_1", "p_2"]
    assert labels.shape == (matrix.shape[0],)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(labels == truth) > 0.85


def test_aggregate_csv_with_header_and_npz(label_files, tmp_path):
    _, with_header, matrix, _ = label_files
    out = tmp_path / "labels.npz"
    result = runner.invoke(
        app, ["aggregate", "--method", "dawid_skene", f"data={with_header}", f"out={out}", "max_iter=20", "cardinality=3"]
    )
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert saved["labels"].shape == (matrix.shape[0],)
    assert saved["probabilities"].shape == (matrix.shape[0], 3)


def test_aggregate_default_output_name(label_files, tmp_path, monkeypatch):
    npy, _, _, _ = label_files
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["aggregate", "method=majority_vote", str(npy)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "L-majority_vote.csv").is_file()


def test_aggregate_bundle_loads(label_files, tmp_path):
    npy, _, matrix, _ = label_files
    bundle = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["aggregate", "method=tensor", f"data={npy}", f"out={tmp_path / 'o.csv'}", f"bundle={bundle}", "seed=3"])
    assert result.exit_code == 0, result.output
    model = Aggregator.load(bundle)
    assert model.name == "tensor"
    assert model.options.seed == 3
    _, labels, _ = _read_output(tmp_path / "o.csv")
    assert np.array_equal(model.predict(matrix), labels)


def test_aggregate_pse_with_distances(tmp_path):
    distances = spider_metric(2)
    matrix, truth = simulate_metric_sources(distances, [3.0, 1.0, 0.7], 500, seed=0)
    np.save(tmp_path / "L.npy", matrix)
    np.savetxt(tmp_path / "D.csv", distances, delimiter=",")
    out = tmp_path / "labels.csv"
    result = runner.invoke(app, ["aggregate", "method=pse", f"data={tmp_path / 'L.npy'}", f"distances={tmp_path / 'D.csv'}", f"out={out}"])
    assert result.exit_code == 0, result.output
    _, labels, probabilities = _read_output(out)
    assert probabilities.shape == (500, 7)
    assert np.mean(labels == truth) > 0.8


def test_aggregate_tie_break_abstain(tmp_path):
    np.save(tmp_path / "tied.npy", np.array([[0, 1, -1], [1, 1, 0], [0, 0, 1]]))
    out = tmp_path / "labels.csv"
    result = runner.invoke(app, ["aggregate", "method=majority_vote", f"data={tmp_path / 'tied.npy'}", f"out={out}", "tie_break=abstain"])
    assert result.exit_code == 0, result.output
    _, labels, _ = _read_output(out)
    assert labels.tolist() == [-1, 1, 0]


def test_aggregate_help_lists_methods():
    result = runner.invoke(app, ["aggregate", "--help"])
    assert result.exit_code == 0, result.output
    for name in ("majority_vote", "snorkel", "flyingsquid", "dawid_skene", "tensor", "pse"):
        assert name in result.output
    assert "[cardinality=K]" in result.output


def test_aggregate_method_help_lists_options():
    result = runner.invoke(app, ["aggregate", "method=pse", "--help"])
    assert result.exit_code == 0, result.output
    assert "max_dims" in result.output
    assert "distances=" in result.output


@pytest.fixture
def bad_files(tmp_path):
    files = {}
    files["range"] = tmp_path / "range.npy"
    np.save(files["range"], np.array([[0, 1, 5], [1, 1, 0]]))
    files["abstain"] = tmp_path / "abstain.npy"
    np.save(files["abstain"], np.full((4, 3), -1))
    files["two"] = tmp_path / "two.npy"
    np.save(files["two"], np.array([[0, 1], [1, 1]]))
    files["shape"] = tmp_path / "shape.npy"
    np.save(files["shape"], np.array([0, 1, 1]))
    files["text"] = tmp_path / "text.csv"
    files["text"].write_text("0,1,1\n0,x,1\n")
    files["ragged"] = tmp_path / "ragged.csv"
    files["ragged"].write_text("0,1,1\n0,1\n")
    files["fraction"] = tmp_path / "fraction.csv"
    files["fraction"].write_text("0,1,1\n0,0.5,1\n")
    files["good"] = tmp_path / "good.npy"
    np.save(files["good"], np.array([[0, 1, 1], [1, 1, 0]]))
    return files


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["method=flyingsquid", "data={range}", "cardinality=3"], "the label 5 at row 0, column 2 is out of range for cardinality 3"),
        (["method=snorkel", "data={abstain}"], "every entry of the label matrix is -1"),
        (["method=flyingsquid", "data={two}"], "needs at least 3 sources (columns), but the label matrix has 2"),
        (["method=majority_vote", "data={shape}"], "must be 2-D"),
        (["method=dawid_skene", "data={text}"], "line 2, column 2 holds 'x', which is not a number"),
        (["method=dawid_skene", "data={ragged}"], "line 2 has 2 values but the first data line has 3"),
        (["method=dawid_skene", "data={fraction}"], "non-integer value 0.5"),
        (["method=flyingsquid", "data=missing.npy"], "data file 'missing.npy' not found"),
        (["data={good}"], "missing method="),
        (["method=flyingsquid"], "missing data=FILE"),
        (["method=nope", "data={good}"], "unknown aggregator 'nope'"),
        (["method=tensor", "data={good}", "n_iter=3"], "unknown option 'n_iter'"),
        (["method=pse", "data={good}"], "needs distances="),
        (["method=majority_vote", "data={good}", "cardinality=one"], "invalid value 'one' for cardinality"),
        (["method=majority_vote", "data={good}", "class_balance=0.5,0.6"], "sums to 1.1"),
        (["method=majority_vote", "data={good}", "out=labels.txt"], "must end in .csv or .npz"),
    ],
)
def test_aggregate_errors_exit_2(words, message, bad_files):
    arguments = ["aggregate", *(word.format(**bad_files) for word in words)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
