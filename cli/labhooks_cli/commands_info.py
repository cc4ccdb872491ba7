"""``labhooks plugins``, ``labhooks sites`` and ``labhooks inspect``."""

from __future__ import annotations

import json

from rich.table import Table

import labhooks
from labhooks.errors import ConfigError
from labhooks_cli.arguments import ParsedArguments
from labhooks_cli.console import console, error_console
from labhooks_cli.loading import load_model_for_cli


def _reject_leftovers(arguments: ParsedArguments, valid: str) -> None:
    if arguments.options:
        unknown = ", ".join(sorted(arguments.options))
        raise ConfigError(f"unknown option(s) {unknown}; valid options are {valid}")


def run_plugins(arguments: ParsedArguments) -> None:
    if arguments.help:
        console.print("labhooks plugins: list installed plugins, their methods, versions and missing extras.")
        return
    _reject_leftovers(arguments, "none")
    registry = labhooks.get_registry()
    table = Table(title="labhooks plugins", show_lines=True)
    for column in ("plugin", "version", "status", "methods", "trainers", "interventions", "aggregators"):
        table.add_column(column, overflow="fold")
    for name, info in sorted(registry.plugins.items()):
        status = "[green]available[/]" if info.available else f"[yellow]unavailable[/]: {info.error}"
        table.add_row(
            name,
            info.version or "-",
            status,
            ", ".join(info.methods) or "-",
            ", ".join(info.trainers) or "-",
            ", ".join(info.interventions) or "-",
            ", ".join(info.aggregators) or "-",
        )
    console.print(table)


def run_sites(arguments: ParsedArguments) -> None:
    if arguments.help:
        console.print("labhooks sites [model=ID|FOLDER|FILE.gguf] [kind=causal_lm|encoder|auto]: list the sites of a model.")
        return
    model_spec = arguments.pop("model")
    kind = arguments.pop("kind", "auto" if model_spec else "causal_lm") or "causal_lm"
    _reject_leftovers(arguments, "model, kind")
    loaded = load_model_for_cli(model_spec, kind)
    model_sites = labhooks.sites(loaded.model)
    table = Table(title=f"sites of {loaded.name} ({model_sites.adapter.name})", show_lines=False)
    for column in ("site", "module", "hook", "width", "layers"):
        table.add_column(column)
    for row in model_sites.table():
        table.add_row(row["site"], row["module"], row["hook"], row["width"], str(row["layers"]))
    console.print(table)
    if model_sites.is_parallel():
        console.print("This model has parallel attention and MLP blocks: pre_mlp is not an input of the MLP.")
    if model_sites.adapter.notes:
        console.print(f"[dim]{model_sites.adapter.notes}[/]")


def run_inspect(arguments: ParsedArguments) -> None:
    if arguments.help:
        console.print("labhooks inspect FILE (or bundle=FILE): show a bundle's manifest and tensor shapes.")
        return
    path = arguments.pop("bundle") or (arguments.positional[0] if arguments.positional else None)
    if path is None:
        raise ConfigError("missing bundle file; for example: labhooks inspect alignez.safetensors")
    _reject_leftovers(arguments, "bundle")
    manifest = labhooks.read_manifest(path)
    summary = Table(title=f"bundle {path}", show_header=False)
    summary.add_column("key")
    summary.add_column("value", overflow="fold")
    plugin = manifest.get("plugin") or {}
    method = manifest.get("method") or {}
    summary.add_row("schema version", str(manifest.get("schema_version")))
    summary.add_row("labhooks version", str(manifest.get("labhooks_version")))
    summary.add_row("plugin", f"{plugin.get('name')} {plugin.get('version') or ''}".strip())
    summary.add_row("method", str(method.get("name")))
    summary.add_row("model", json.dumps(manifest.get("model")))
    summary.add_row("config", json.dumps(method.get("config"), indent=1))
    console.print(summary)

    tensors = Table(title="tensors", show_lines=False)
    for column in ("intervention", "class", "site", "positions", "parameter", "shape", "dtype"):
        tensors.add_column(column)
    for index, entry in enumerate(manifest.get("interventions", [])):
        for name, tensor in entry.get("tensors", {}).items():
            tensors.add_row(
                str(index), entry.get("class"), entry.get("site"), entry.get("positions"), name, str(tensor["shape"]), tensor["dtype"]
            )
    for name, tensor in manifest.get("tensors", {}).items():
        tensors.add_row("-", "-", "-", "-", name, str(tensor["shape"]), tensor["dtype"])
    console.print(tensors)
    if not manifest.get("interventions") and not manifest.get("tensors"):
        error_console.print("the bundle contains no tensors")
