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
    while not await _holds(check):
        if loop.time() - start > within_s:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(interval_s)
    return loop.time() - start


async def _holds(check: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = check()
    return await result if inspect.isawaitable(result) else result
