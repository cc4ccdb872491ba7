"""The ``labhooks`` command: typer commands that share the ``key=value`` grammar.

Each command takes its options as ``key=value`` words (``--key value`` works too), so a
method's options can come from its typed config instead of typer signatures.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from labhooks_cli.arguments import ParsedArguments, parse_arguments
from labhooks_cli.console import run_guarded, setup_logging

app = typer.Typer(
    name="labhooks",
    help="Edit what a transformer computes with forward hooks at named sites.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_OPEN_ARGUMENTS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _dispatch(context: typer.Context, command: Callable[[ParsedArguments], None]) -> None:
    words = list(context.args)
    debug = "--debug" in words
    setup_logging(debug)

    def body() -> None:
        command(parse_arguments(words))

    run_guarded(body, debug)


@app.command(context_settings=_OPEN_ARGUMENTS)
def apply(context: typer.Context) -> None:
    """Fit a method and write its bundle: labhooks apply plugin=NAME [model=...] [key=value ...] [out=FILE]."""
    from labhooks_cli.commands_apply import run_apply

    _dispatch(context, run_apply)


@app.command(context_settings=_OPEN_ARGUMENTS)
def generate(context: typer.Context) -> None:
    """Generate with a bundle attached, next to the base model: labhooks generate bundle=FILE prompt="..."."""
    from labhooks_cli.commands_apply import run_generate

    _dispatch(context, run_generate)


@app.command(context_settings=_OPEN_ARGUMENTS)
def train(context: typer.Context) -> None:
    """Train a trainable method and write its bundle: labhooks train plugin=steer method=... data=FILE."""
    from labhooks_cli.commands_train import run_train

    _dispatch(context, run_train)


@app.command(context_settings=_OPEN_ARGUMENTS)
def aggregate(context: typer.Context) -> None:
    """Fit a label model on a label matrix: labhooks aggregate method=NAME data=L.npy."""
    from labhooks_cli.commands_aggregate import run_aggregate

    _dispatch(context, run_aggregate)


@app.command(context_settings=_OPEN_ARGUMENTS)
def sites(context: typer.Context) -> None:
    """List the sites of a model: labhooks sites [model=...]."""
    from labhooks_cli.commands_info import run_sites

    _dispatch(context, run_sites)


@app.command(context_settings=_OPEN_ARGUMENTS)
def plugins(context: typer.Context) -> None:
    """List installed plugins with their methods, versions and missing extras."""
    from labhooks_cli.commands_info import run_plugins

    _dispatch(context, run_plugins)


@app.command(context_settings=_OPEN_ARGUMENTS)
def inspect(context: typer.Context) -> None:
    """Show a bundle's manifest and tensor shapes: labhooks inspect FILE."""
    from labhooks_cli.commands_info import run_inspect

    _dispatch(context, run_inspect)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
