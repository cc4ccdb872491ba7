"""``labhooks apply`` (fit a method, write its bundle) and ``labhooks generate`` (use one)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from torch import nn

import labhooks
from labhooks.config import build_config, config_to_dict
from labhooks.errors import ConfigError
from labhooks.generation import generate_texts
from labhooks.methods import Method, MethodInputs, ReportTable
from labhooks.models import DEFAULT_ENCODER_NAME, DEFAULT_MODEL_NAME, LoadedModel
from labhooks.training import WEIGHTS_PREFIX
from labhooks_cli.arguments import ParsedArguments
from labhooks_cli.console import RichProgress, console, error_console, print_config_options, render_table
from labhooks_cli.loading import load_model_for_cli

_COMMON_APPLY_OPTIONS = ("plugin", "method", "model", "out")


def _slug(text: str) -> str:
    name = Path(text).name if ("/" in text or text.endswith(".gguf")) else text
    name = name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower() or "model"


def print_method_help(plugin: str, method: Method) -> None:
    """Print a method's summary and every option of its config, with defaults and units."""
    console.print(f"[bold]labhooks apply plugin={plugin} method={method.name}[/]  {method.summary}")
    console.print("Common options: model=ID|FOLDER|FILE.gguf (default: the embedded model), out=FILE.safetensors, --debug")
    print_config_options(f"options of {plugin}/{method.name}", method.config_class)


def _print_plugin_list() -> None:
    registry = labhooks.get_registry()
    names = [f"{name} ({', '.join(info.methods)})" for name, info in sorted(registry.plugins.items()) if info.methods]
    console.print("labhooks apply plugin=NAME [method=M] [model=...] [out=FILE] [key=value ...]")
    console.print("Plugins with methods: " + ("; ".join(names) or "none"))
    console.print("Options of one method: labhooks apply plugin=NAME --help")


def run_apply(arguments: ParsedArguments) -> None:
    plugin = arguments.pop("plugin")
    if plugin is None:
        if arguments.help:
            _print_plugin_list()
            return
        raise ConfigError("missing plugin=...; for example: labhooks apply plugin=alignez (labhooks plugins lists them)")
    registry = labhooks.get_registry()
    method = registry.method(plugin, arguments.pop("method"))
    if arguments.help:
        print_method_help(plugin, method)
        return

    model_spec = arguments.pop("model")
    out = arguments.pop("out")
    if out is not None and not out.endswith(".safetensors"):
        # Checked before fitting, which can take minutes.
        raise ConfigError(f"out={out} must name a .safetensors file, for example out=result.safetensors")
    if arguments.positional:
        raise ConfigError(f"unexpected argument(s) {' '.join(arguments.positional)}: options take the form key=value")
    try:
        config = build_config(method.config_class, arguments.options)
    except ConfigError as error:
        raise ConfigError(f"{error} (common options: {', '.join(_COMMON_APPLY_OPTIONS)})") from None

    loaded = None
    if method.model_kind != "none":
        loaded = load_model_for_cli(model_spec, method.model_kind)
    elif model_spec is not None:
        raise ConfigError(f"method {plugin}/{method.name} uses no model; remove model={model_spec}")

    result = method.run(MethodInputs(config=config, loaded=loaded, progress=RichProgress()))

    model_name = loaded.name if loaded is not None else "nomodel"
    target = Path(out) if out else Path(f"{plugin}-{method.name}-{_slug(model_name)}.safetensors")
    labhooks.save_bundle(
        target,
        result.interventions,
        plugin=plugin,
        method=method.name,
        config=config_to_dict(config),
        model=loaded.model if loaded is not None else None,
        tensors=result.tensors,
        metadata=result.metadata,
    )
    for table in result.tables:
        console.print(render_table(table))
    if result.metrics:
        metrics = ReportTable("metrics", ["metric", "value"], [[key, value] for key, value in result.metrics.items()])
        console.print(render_table(metrics))
    console.print(f"bundle written: [bold]{target}[/] ({len(result.interventions)} interventions)")


def _model_for_bundle(manifest: dict, model_spec: str | None) -> tuple[str | None, str]:
    if model_spec is not None:
        return model_spec, "auto"
    recorded = (manifest.get("model") or {}).get("name_or_path")
    if recorded in (None, DEFAULT_MODEL_NAME):
        return None, "causal_lm"
    if recorded == DEFAULT_ENCODER_NAME:
        return None, "encoder"
    return str(recorded), "auto"


def _read_prompts(arguments: ParsedArguments) -> list[str]:
    prompt = arguments.pop("prompt")
    prompts_file = arguments.pop("prompts")
    if prompt is not None and prompts_file is not None:
        raise ConfigError("give prompt=... or prompts=FILE, not both")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("prompt= is empty; give the text to generate from")
        return [prompt]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts file {prompts_file!r} not found")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"prompts file {prompts_file!r} contains no prompts (one per line)")
        return lines
    raise ConfigError('missing prompt="..." or prompts=FILE (one prompt per line)')


def _int_option(arguments: ParsedArguments, key: str, default: int) -> int:
    text = arguments.pop(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"invalid value {text!r} for {key}: expected an integer") from None
    if value < 1:
        raise ConfigError(f"invalid value {value} for {key}: must be >= 1")
    return value


def _weights_loader(bundle: labhooks.Bundle) -> Callable[[LoadedModel, labhooks.Bundle], nn.Module] | None:
    """Return the trainer function that applies a bundle's ``weights.*`` tensors, if it has any."""
    if not any(key.startswith(WEIGHTS_PREFIX) for key in bundle.tensors):
        return None
    trainer = labhooks.get_registry().trainers.get((str(bundle.plugin), str(bundle.method)))
    loader = getattr(trainer, "apply_weights", None)
    if loader is None:
        raise ConfigError(
            f"bundle {bundle.path} contains model weights of {bundle.plugin}/{bundle.method}, but no installed trainer "
            "applies them; install the plugin that wrote the bundle"
        )
    return loader


def run_generate(arguments: ParsedArguments) -> None:
    if arguments.help:
        console.print('labhooks generate bundle=FILE [model=...] prompt="..." | prompts=FILE [max_new_tokens=64] [batch_size=8]')
        console.print("Generates greedily with and without the bundle attached and prints both side by side.")
        return
    bundle_path = arguments.pop("bundle") or (arguments.positional.pop(0) if arguments.positional else None)
    if bundle_path is None:
        raise ConfigError("missing bundle=FILE; for example: labhooks generate bundle=alignez.safetensors prompt='Hello'")
    manifest = labhooks.read_manifest(bundle_path)
    prompts = _read_prompts(arguments)
    max_new_tokens = _int_option(arguments, "max_new_tokens", 64)
    batch_size = _int_option(arguments, "batch_size", 8)
    model_spec, kind = _model_for_bundle(manifest, arguments.pop("model"))
    if arguments.options or arguments.positional:
        unknown = ", ".join(sorted(arguments.options) + arguments.positional)
        raise ConfigError(f"unknown option(s) {unknown}; valid options are bundle, model, prompt, prompts, max_new_tokens, batch_size")

    loaded = load_model_for_cli(model_spec, kind)
    bundle = labhooks.load_bundle(bundle_path, loaded.model)
    apply_weights = _weights_loader(bundle)
    if not bundle.interventions and apply_weights is None:
        raise ConfigError(
            f"bundle {bundle_path} contains no interventions to attach and no model weights a trainer can apply "
            "(it may contain a label model or other tensors)"
        )
    progress = RichProgress()
    base = generate_texts(
        loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, description="base"
    )
    # Weights go in after the base generation, because LoRA and SFT bundles change the model in place.
    model = apply_weights(loaded, bundle) if apply_weights is not None else loaded.model
    with labhooks.attach(model, bundle.interventions):
        steered = generate_texts(
            model,
            loaded.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            description="steered",
        )
    table = ReportTable(
        f"{bundle.plugin}/{bundle.method} on {loaded.name}",
        ["prompt", "base", "steered"],
        [list(row) for row in zip(prompts, base, steered, strict=True)],
    )
    console.print(render_table(table))
    error_console.print(f"{sum(b != s for b, s in zip(base, steered, strict=True))} of {len(prompts)} generations changed")
