"""Waiting for a condition, as the tests and the local stack do: on the condition, never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], within_s: float, what: str, interval_s: float = 0.02
) -> float:
    """Seconds until ``check`` (a function or a coroutine function) holds; AssertionError past ``within_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        # The whole wait, the checks included: a check that never returns fails too.
        async with asyncio.timeout(within_s):
            while not await _holds(check):  # noqa: ASYNC110 - polling is the point: no event says it
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise AssertionError(f"not within {within_s} s: {what}") from None
    return loop.time() - start


async def _holds(check: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = check()
    return await result if inspect.isawaitable(result) else result
