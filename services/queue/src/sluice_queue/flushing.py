"""Writing what is kept in memory to the data-access service, again and again until it takes it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


async def flush_forever(
    flush: Callable[[], Awaitable[bool]],
    wake: asyncio.Event,
    interval_s: float,
    retry_max_s: float,
    waiting: Callable[[], bool] = lambda: True,
) -> None:
    """Call ``flush`` when ``wake`` is set, or every interval while ``waiting()``; back off
    (doubling, up to ``retry_max_s``) while it returns False. Runs until cancelled."""
    delay = interval_s
    while True:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancellation that stops this.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay if waiting() else None):
                await wake.wait()
        wake.clear()
        delay = interval_s if await flush() else min(retry_max_s, delay * 2)
