"""Progress reporting that library code can call and the CLI can render.

Library code wraps long loops in ``progress.track(...)``. The default reporter logs at
INFO level every tenth of the way; the CLI passes a reporter that draws rich progress
bars. Nothing here prints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

Item = TypeVar("Item")
logger = logging.getLogger("labhooks.progress")


class Progress(Protocol):
    """Anything that can follow a loop: the logging default or the CLI's rich bars."""

    def track(self, items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]: ...


class LoggingProgress:
    """Log the description at the start and then every tenth of the loop."""

    def track(self, items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        logger.info("%s: started%s", description, f" ({total} steps)" if total else "")
        step = max(1, (total or 0) // 10)
        done = 0
        for item in items:
            yield item
            done += 1
            if total and done % step == 0 and done < total:
                logger.info("%s: %d/%d", description, done, total)
        logger.info("%s: done (%d steps)", description, done)
