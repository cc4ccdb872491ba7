"""The query set: the shipped everyday queries or a user's file, drawn and split with a seed."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from labhooks.errors import ConfigError

SHIPPED_QUERIES = "queries.jsonl"


def _query_of(item: object, where: str) -> str:
    text = item.get("query") if isinstance(item, dict) else item
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: expected a non-empty string or an object with a 'query' string, got {item!r}")
    return text.strip()


def parse_queries(text: str, suffix: str, source: str) -> list[str]:
    """Read queries from ``.jsonl`` (one JSON value a line), ``.json`` (a list) or plain lines."""
    if suffix == ".jsonl":
        queries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{source} line {number} is not valid JSON ({error.msg})") from None
            queries.append(_query_of(item, f"{source} line {number}"))
    elif suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source} is not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{source} must hold a JSON list of queries, got {type(items).__name__}")
        queries = [_query_of(item, f"{source} item {index}") for index, item in enumerate(items)]
    else:
        queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise ConfigError(f"{source} contains no queries")
    return queries


def load_queries(path: str = "") -> list[str]:
    """Load the queries of ``path``, or the shipped set when ``path`` is empty."""
    if not path:
        shipped = resources.files("labhooks_alignez") / "data" / SHIPPED_QUERIES
        return parse_queries(shipped.read_text(encoding="utf-8"), ".jsonl", f"the shipped {SHIPPED_QUERIES}")
    source = Path(path).expanduser()
    if not source.is_file():
        raise ConfigError(f"query file {path!r} not found; give a .jsonl, .json or text file, or leave queries= empty for the shipped set")
    return parse_queries(source.read_text(encoding="utf-8"), source.suffix.lower(), str(source))


def draw_and_split(queries: list[str], count: int, held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """Draw ``count`` queries (all of them for 0) in a seeded order and split off the held-out ones.

    The held-out part is the last ``round(count * held_out)`` queries of the draw, at
    least one, and at least two queries are left to fit on.
    """
    unique = list(dict.fromkeys(queries))
    if count and count > len(unique):
        raise ConfigError(f"invalid value {count} for num_queries: the query set has only {len(unique)} distinct queries")
    drawn = random.Random(seed).sample(unique, count or len(unique))
    held_count = max(1, round(len(drawn) * held_out))
    if len(drawn) - held_count < 2:
        raise ConfigError(
            f"{len(drawn)} queries with held_out={held_out} leave {len(drawn) - held_count} to fit on; "
            "fitting needs at least 2: raise num_queries or lower held_out"
        )
    return drawn[:-held_count], drawn[-held_count:]
