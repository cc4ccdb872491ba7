"""AlignEZ through the CLI on the embedded SmolLM2-135M-Instruct: apply, then generate with the bundle."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import labhooks
from labhooks.methods import ReportTable
from labhooks_cli import commands_apply
from labhooks_cli.main import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small enough to run in about a minute on two CPU cores; alpha=4 makes the edit visible
# within 12 greedy tokens from so few pairs.
APPLY_OPTIONS = [
    "num_queries=6",
    "held_out=0.34",
    "characteristics_tokens=12",
    "response_tokens=20",
    "compare_prompts=2",
    "compare_tokens=12",
    "batch_size=8",
    "alpha=4",
]


@pytest.fixture
def printed_tables(monkeypatch) -> list[ReportTable]:
    """Collect every table the CLI renders, with the exact cell texts."""
    tables: list[ReportTable] = []
    render = commands_apply.render_table

    def record(table: ReportTable):
        tables.append(table)
        return render(table)

    monkeypatch.setattr(commands_apply, "render_table", record)
    return tables


def test_apply_then_generate_reproduces_steered_text(tmp_path, printed_tables):
    runner = CliRunner()
    bundle_path = tmp_path / "alignez.safetensors"

    applied = runner.invoke(app, ["apply", "plugin=alignez", *APPLY_OPTIONS, f"out={bundle_path}"])
    assert applied.exit_code == 0, applied.output
    assert bundle_path.is_file()
    assert "preference_margin" in applied.output

    manifest = labhooks.read_manifest(bundle_path)
    assert manifest["plugin"]["name"] == "alignez"
    assert manifest["model"]["num_layers"] == 30
    assert manifest["model"]["hidden_size"] == 576
    assert all(entry["class"] == "alignez" for entry in manifest["interventions"])
    comparison = manifest["metadata"]["comparison"]
    applied_table = printed_tables[0]
    assert applied_table.columns == ["prompt", "base", "steered"]
    assert [row[2] for row in applied_table.rows] == comparison["steered"]

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(comparison["prompts"]) + "\n")
    printed_tables.clear()
    generated = runner.invoke(
        app,
        [
            "generate",
            f"bundle={bundle_path}",
            f"prompts={prompts_file}",
            f"max_new_tokens={comparison['max_new_tokens']}",
            f"batch_size={comparison['batch_size']}",
        ],
    )
    assert generated.exit_code == 0, generated.output

    rows = printed_tables[0].rows
    assert [row[0] for row in rows] == comparison["prompts"]
    assert [row[1] for row in rows] == comparison["base"]
    assert [row[2] for row in rows] == comparison["steered"]
    assert any(base != steered for _, base, steered in rows)
