"""Writing what is kept in memory to the data-access service, again and again until it takes it."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import Gauge

from sluice_core.service import raise_if_cancelled, woken

T = TypeVar("T")


class Kept(Generic[T]):
    """What waits in this process to be written, oldest first: at most ``most``, past which the oldest
    goes (memory is finite; ``add`` returns it, for its owner to count and log). ``gauge`` shows how many wait."""

    def __init__(self, most: int, gauge: Gauge) -> None:
        self._items: deque[T] = deque()
        self._most = most
        self._gauge = gauge

    def add(self, item: T) -> T | None:
        dropped = self._items.popleft() if len(self._items) >= self._most else None
        self._items.append(item)
        self._gauge.set(len(self._items))
        return dropped

    def oldest(self, n: int = 1) -> list[T]:
        return list(itertools.islice(self._items, n))

    def remove_oldest(self, n: int = 1) -> None:
        for _ in range(n):
            self._items.popleft()
        self._gauge.set(len(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


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
        raise_if_cancelled()
        await woken(wake, delay if waiting() else None)
        wake.clear()
        delay = interval_s if await flush() else min(retry_max_s, delay * 2)
