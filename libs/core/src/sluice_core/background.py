"""Work done off a caller's path (a slot's release, a budget's settlement, a span's end), in tasks kept alive.

asyncio holds only weak references to tasks: one nobody keeps may be
collected before it finishes. ``Background`` keeps each until it is done,
logs a failure instead of leaving it unretrieved, and can wait for the rest
at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Background:
    def __init__(self, what: str) -> None:
        """``what`` names the work in the log line of a failure."""
        self._what = what
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own; a failure is logged, not raised to anyone."""
        task = asyncio.ensure_future(_logged(work, self._what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the work still under way (at shutdown)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)


async def _logged(work: Coroutine[Any, Any, None], what: str) -> None:
    try:
        await work
    except Exception:
        logger.exception("%s failed", what)
