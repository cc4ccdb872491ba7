"""The plugin manager: built-in registration, unavailable plugins, and a third-party package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import labhooks
from labhooks.errors import PluginError
from labhooks.plugins import PluginInfo, Registry, build_registry

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "labhooks-example-plugin"


def test_core_plugin_registers_steering_vector():
    registry = labhooks.get_registry()
    assert registry.plugins["core"].available
    assert registry.intervention_class("steering_vector") is labhooks.SteeringVector


def test_unknown_names_list_choices():
    registry = labhooks.get_registry()
    with pytest.raises(PluginError, match="unknown plugin 'nope'.*core"):
        registry.method("nope")
    with pytest.raises(PluginError, match="no installed plugin provides the intervention class 'missing'"):
        registry.intervention_class("missing")


def test_unavailable_plugin_names_extra():
    registry = Registry()
    registry.plugins["ws"] = PluginInfo(
        "ws", "0.1", "labhooks_ws.plugin", False, "missing module 'tensorly'; install it with `pip install 'labhooks[ws]'`"
    )
    with pytest.raises(PluginError, match=r"labhooks\[ws\]"):
        registry.method("ws")


def test_extra_plugin_module_is_collected():
    module = type(sys)("in_memory_plugin")

    @labhooks.hookimpl
    def labhooks_interventions():
        return [labhooks.SteeringVector]

    module.labhooks_interventions = labhooks_interventions
    registry = build_registry(extra_plugins={"memory": module})
    assert "steering_vector" in registry.plugins["memory"].interventions


@pytest.mark.slow
def test_third_party_package_discovered_and_round_trips(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr
    script = (
        textwrap.dedent(
            """
        import sys, torch
        sys.path.insert(0, TESTS)
        from conftest import make_decoder, prompt_ids
        import labhooks
        registry = labhooks.get_registry()
        info = registry.plugins["example"]
        assert info.available, info.error
        assert info.methods == ["dampen"], info.methods
        model = make_decoder("llama")
        method = registry.method("example")
        config = labhooks.build_config(method.config_class, {"factor": "0.25", "site": "post_block[1]"})
        loaded = labhooks.LoadedModel(model, None, "tiny")
        result = method.run(labhooks.MethodInputs(config=config, loaded=loaded))
        path = labhooks.save_bundle(OUT, result.interventions, plugin="example", method="dampen", model=model)
        bundle = labhooks.load_bundle(path, model)
        assert bundle.manifest["plugin"] == {"name": "example", "version": "0.1.0"}, bundle.manifest["plugin"]
        ids = prompt_ids([4])[0][None]
        with torch.no_grad():
            with labhooks.attach(model, result.interventions):
                first = model(ids).logits
            with labhooks.attach(model, bundle.interventions):
                second = model(ids).logits
            plain = model(ids).logits
        assert torch.equal(first, second)
        assert not torch.equal(first, plain)
        print("ok")
        """
        )
        .replace("TESTS", repr(str(Path(__file__).parent)))
        .replace("OUT", repr(str(tmp_path / "example.safetensors")))
    )
    environment = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("ok")


def test_unavailable_reason_names_extra():
    from importlib.metadata import EntryPoint

    from labhooks.plugins import _unavailable_reason

    point = EntryPoint(name="ws", value="labhooks_ws.plugin", group="labhooks")
    reason = _unavailable_reason(point, ModuleNotFoundError("No module named 'tensorly'", name="tensorly"))
    assert reason == "missing module 'tensorly'; install it with `pip install 'labhooks[ws]'`"
