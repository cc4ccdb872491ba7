"""The CLI's shared grammar and its error handling: exit status 2 and a message naming the value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from typer.testing import CliRunner

import labhooks
from labhooks.errors import ConfigError
from labhooks_cli.arguments import parse_arguments
from labhooks_cli.main import app

from conftest import make_decoder

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from labhooks_cli import console

    monkeypatch.setattr(console.console, "width", 200)
    monkeypatch.setattr(console.error_console, "width", 200)


def test_parse_key_value_and_dash_forms():
    parsed = parse_arguments(["plugin=alignez", "--max-new-tokens", "16", "--flag", "--alpha=2", "FILE", "--debug"])
    assert parsed.options == {"plugin": "alignez", "max_new_tokens": "16", "flag": "true", "alpha": "2"}
    assert parsed.positional == ["FILE"]
    assert parsed.debug


def test_parse_duplicate_key():
    with pytest.raises(ConfigError, match="given twice"):
        parse_arguments(["alpha=1", "--alpha", "2"])


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["apply", "plugin=nope"], "unknown plugin 'nope'"),
        (["apply"], "missing plugin="),
        (["inspect", "missing.safetensors"], "'missing.safetensors' not found"),
        (["inspect"], "missing bundle file"),
        (["generate", "bundle=missing.safetensors", "prompt=hi"], "'missing.safetensors' not found"),
        (["sites", "model=/no/such/folder"], "'/no/such/folder' not found"),
        (["sites", "model=./nothing.gguf"], "'./nothing.gguf' not found"),
        (["plugins", "colour=red"], "unknown option(s) colour"),
    ],
)
def test_cli_errors_exit_2(words, message):
    result = runner.invoke(app, words)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_debug_shows_traceback():
    result = runner.invoke(app, ["inspect", "missing.safetensors", "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_cli_inspect_bundle(tmp_path):
    model = make_decoder("llama")
    path = labhooks.save_bundle(
        tmp_path / "b.safetensors", [labhooks.SteeringVector("post_block[1]", torch.ones(32))], plugin="core", method="demo", model=model
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "steering_vector" in result.output
    assert "post_block[1]" in result.output
    assert "[32]" in result.output


def test_cli_plugins_lists_core():
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "core" in result.output
    assert "steering_vector" in result.output


@pytest.mark.integration
@pytest.mark.slow
def test_cli_sites_default_model():
    result = runner.invoke(app, ["sites"])
    assert result.exit_code == 0, result.output
    assert "model.layers.{l}.self_attn.o_proj" in result.output
    assert "9 x 64" in result.output
    assert "30" in result.output


def _demo_plugin():
    """An in-memory plugin with one model-free method, for testing `labhooks apply`."""

    @dataclass
    class DemoConfig:
        width: int = labhooks.option(8, "Width of the vector.", unit="features")
        scale: float = labhooks.option(1.0, "Scale of the vector.")
        mode: Literal["add", "scale"] = labhooks.option("add", "How the vector is applied.")

    def run(inputs):
        vector = labhooks.SteeringVector("post_block[0]", torch.ones(inputs.config.width) * inputs.config.scale)
        table = labhooks.ReportTable("demo", ["key", "value"], [["mode", inputs.config.mode]])
        return labhooks.MethodResult(interventions=[vector], tables=[table], metrics={"scale": inputs.config.scale})

    module = type(pytest)("demo_plugin")

    @labhooks.hookimpl
    def labhooks_methods():
        return [labhooks.Method("vector", DemoConfig, run, "Make a constant vector.", model_kind="none")]

    module.labhooks_methods = labhooks_methods
    return module


@pytest.fixture
def demo_registry(monkeypatch):
    from labhooks import plugins

    registry = plugins.build_registry(extra_plugins={"demo": _demo_plugin()})
    monkeypatch.setattr(plugins, "_registry", registry)
    return registry


def test_apply_writes_bundle(demo_registry, tmp_path):
    out = tmp_path / "demo.safetensors"
    result = runner.invoke(app, ["apply", "plugin=demo", "--width", "4", "scale=2.5", f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "bundle written" in result.output
    bundle = labhooks.load_bundle(out)
    assert torch.equal(bundle.interventions[0].vector, torch.full((4,), 2.5))
    assert bundle.config == {"width": 4, "scale": 2.5, "mode": "add"}
    assert bundle.plugin == "demo"


def test_apply_help_lists_options(demo_registry):
    result = runner.invoke(app, ["apply", "plugin=demo", "--help"])
    assert result.exit_code == 0, result.output
    assert "width" in result.output
    assert "features" in result.output
    assert "add | scale" in result.output


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["apply", "plugin=demo", "colour=red"], "unknown option 'colour'; valid options are mode, scale, width"),
        (["apply", "plugin=demo", "width=wide"], "invalid value 'wide' for width: expected an integer"),
        (["apply", "plugin=demo", "mode=multiply"], "invalid value 'multiply' for mode: choose one of add, scale"),
        (["apply", "plugin=demo", "method=other"], "plugin 'demo' has no method 'other'; its methods are vector"),
        (["apply", "plugin=demo", "model=x"], "uses no model; remove model=x"),
        (["apply", "plugin=demo", "stray"], "unexpected argument(s) stray"),
        (["apply", "plugin=demo", "out=result.pt"], "out=result.pt must name a .safetensors file"),
    ],
)
def test_apply_errors_exit_2(demo_registry, words, message):
    result = runner.invoke(app, words)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
