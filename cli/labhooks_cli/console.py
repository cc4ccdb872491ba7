"""Rich output for the CLI: tables, progress bars and error reporting."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from labhooks.errors import LabhooksError
from labhooks.methods import ReportTable

Item = TypeVar("Item")
EXIT_USAGE = 2

console = Console()
error_console = Console(stderr=True)


def setup_logging(debug: bool) -> None:
    """Send library log records to stderr through rich: INFO normally, DEBUG with --debug."""
    handler = RichHandler(console=error_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("labhooks").setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("labhooks.progress").setLevel(logging.WARNING)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class RichProgress:
    """A :class:`labhooks.progress.Progress` that draws one rich bar per loop."""

    def track(self, items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=error_console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)


def print_config_options(title: str, config_class: type) -> None:
    """Print every field of a method's config: name, type or choices, default, unit and help."""
    from labhooks.config import fields_of

    table = Table(title=title, show_lines=False)
    for column in ("option", "type", "default", "unit", "help"):
        table.add_column(column, overflow="fold")
    for field in fields_of(config_class):
        default = ",".join(str(v) for v in field.default) if isinstance(field.default, list) else format_cell(field.default)
        type_name = field.type_name if not field.choices else " | ".join(field.choices)
        table.add_row(field.name, type_name, default, field.unit or "", field.help)
    console.print(table)


def render_table(report: ReportTable) -> Table:
    table = Table(title=report.title, show_lines=True)
    for column in report.columns:
        table.add_column(column, overflow="fold")
    for row in report.rows:
        table.add_row(*(format_cell(cell) for cell in row))
    return table


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_guarded(action: Callable[[], None], debug: bool) -> None:
    """Run a command body; a labhooks error or bad input becomes one line on stderr and exit 2."""
    try:
        action()
    except (LabhooksError, FileNotFoundError) as error:
        if debug:
            traceback.print_exc()
        error_console.print(f"[bold red]error:[/] {error}", highlight=False)
        if not debug:
            error_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        error_console.print("[bold red]interrupted[/]")
        sys.exit(130)
