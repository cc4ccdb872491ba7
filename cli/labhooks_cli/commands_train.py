"""``labhooks train``: train a trainable method on a data file, write its bundle, print the evaluation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import labhooks
from labhooks.config import build_config, config_to_dict
from labhooks.errors import ConfigError
from labhooks.training import TrainableMethod, TrainInputs, split_examples
from labhooks_cli.arguments import ParsedArguments
from labhooks_cli.commands_apply import _slug
from labhooks_cli.console import RichProgress, console, print_config_options, render_table
from labhooks_cli.loading import load_model_for_cli

_COMMON_TRAIN_OPTIONS = ("plugin", "method", "model", "out")


def print_trainer_help(plugin: str, trainer: TrainableMethod) -> None:
    """Print a trainable method's summary and every option of its config, with defaults and units."""
    console.print(f"[bold]labhooks train plugin={plugin} method={trainer.name} data=FILE[/]  {trainer.summary}")
    console.print("Common options: model=ID|FOLDER|FILE.gguf (default: the embedded model), out=FILE.safetensors, --debug")
    print_config_options(f"options of {plugin}/{trainer.name}", trainer.config_class)


def _print_trainer_list() -> None:
    registry = labhooks.get_registry()
    names = [f"{name} ({', '.join(info.trainers)})" for name, info in sorted(registry.plugins.items()) if info.trainers]
    console.print("labhooks train plugin=NAME method=M data=FILE [model=...] [out=FILE] [key=value ...]")
    console.print("Plugins with trainable methods: " + ("; ".join(names) or "none"))
    console.print("Options of one method: labhooks train plugin=NAME method=M --help")


def run_train(arguments: ParsedArguments) -> None:
    plugin = arguments.pop("plugin")
    if plugin is None:
        if arguments.help:
            _print_trainer_list()
            return
        raise ConfigError("missing plugin=...; for example: labhooks train plugin=steer method=post_block data=train.jsonl")
    trainer = labhooks.get_registry().trainer(plugin, arguments.pop("method"))
    if arguments.help:
        print_trainer_help(plugin, trainer)
        return

    model_spec = arguments.pop("model")
    out = arguments.pop("out")
    if arguments.positional:
        raise ConfigError(f"unexpected argument(s) {' '.join(arguments.positional)}: options take the form key=value")
    try:
        config = build_config(trainer.config_class, arguments.options)
    except ConfigError as error:
        raise ConfigError(f"{error} (common options: {', '.join(_COMMON_TRAIN_OPTIONS)})") from None
    if config.data is None:
        raise ConfigError(
            f"missing data=FILE: a JSONL or CSV file with prompt and completion fields; for example: labhooks train plugin={plugin} method={trainer.name} data=train.jsonl"
        )
    if out is not None and not out.endswith(".safetensors"):
        raise ConfigError(f"invalid out={out!r}: the bundle file name must end in .safetensors")

    # Read and split the data before the model loads, so that a data mistake fails fast.
    examples, eval_examples = split_examples(config)
    loaded = load_model_for_cli(model_spec)
    target = Path(out) if out else Path(f"{plugin}-{trainer.name}-{_slug(loaded.name)}.safetensors")
    if config.save_every and config.checkpoint_dir is None:
        config = replace(config, checkpoint_dir=str(target.with_name(f"{target.stem}-checkpoints")))

    inputs = TrainInputs(config, loaded, plugin, examples=examples, eval_examples=eval_examples, progress=RichProgress())
    result = trainer.train(inputs)
    if not result.main_process:
        # Under `accelerate launch`, the main process writes the bundle and prints the tables.
        return

    labhooks.save_bundle(
        target,
        result.interventions,
        plugin=plugin,
        method=trainer.name,
        config=config_to_dict(config),
        model=loaded.model,
        tensors=result.tensors,
        metadata=result.metadata,
    )
    for table in result.tables:
        console.print(render_table(table))
    console.print(f"bundle written: [bold]{target}[/] ({len(result.interventions)} interventions, {len(result.tensors)} weight tensors)")
