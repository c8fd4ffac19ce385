"""Cache-aside in Redis, with no stampedes, and degrading to PostgreSQL when Redis fails.

A miss is loaded once: concurrent readers in this process wait for the one
load already under way, and readers in other processes wait while the process
that took a short Redis lock (SET NX PX) loads and fills the key. TTLs get a
random spread, so keys filled together do not expire together. Writers
delete the keys they change and publish the change (see ``invalidation.py``).

When Redis errors or is slower than its timeout, reads go to PostgreSQL and
Redis is left alone for a second, so an outage costs one timeout per second,
not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from prometheus_client import Counter
from redis.asyncio import Redis

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOOKUPS = Counter(
    "sluice_datastore_cache_lookups", "Cache lookups by kind and result (hit, miss, error).", ["kind", "result"]
)

_POLL_S = 0.005


class Codec(Generic[T]):
    def __init__(self, encode: Callable[[T | None], str], decode: Callable[[str], T | None]) -> None:
        self.encode = encode
        self.decode = decode


class Cache:
    def __init__(
        self,
        redis: Redis,
        *,
        timeout_s: float = 0.05,
        jitter: float = 0.1,
        lock_ttl_s: float = 2.0,
        backoff_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._jitter = jitter
        self._lock_ttl_s = lock_ttl_s
        self._backoff_s = backoff_s
        self._down_until = 0.0
        self._inflight: dict[str, asyncio.Task[Any]] = {}

    @property
    def redis_up(self) -> bool:
        return time.monotonic() >= self._down_until

    async def get_or_load(
        self,
        kind: str,
        key: str,
        load: Callable[[], Awaitable[T | None]],
        codec: Codec[T],
        ttl_s: float,
        negative_ttl_s: float | None = None,
        field: str = "",
    ) -> T | None:
        """The cached value, or ``load()`` once across this process and others; None is cached too."""
        flight = f"{key}#{field}"
        task: asyncio.Task[T | None] | None = self._inflight.get(flight)
        if task is None:
            # A task of its own: a caller that leaves (cancelled, or past its deadline)
            # must not fail the others waiting for the same load.
            fetch = self._fetch(kind, key, field, load, codec, ttl_s, negative_ttl_s)
            task = asyncio.ensure_future(fetch)
            self._inflight[flight] = task
            task.add_done_callback(lambda done: self._landed(flight, done))
        return await asyncio.shield(task)

    def _landed(self, flight: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(flight) is task:
            del self._inflight[flight]
        if not task.cancelled():
            task.exception()  # retrieved: a failure with no caller left waiting is not worth a warning

    async def _fetch(
        self,
        kind: str,
        key: str,
        field: str,
        load: Callable[[], Awaitable[T | None]],
        codec: Codec[T],
        ttl_s: float,
        negative_ttl_s: float | None,
    ) -> T | None:
        cached = await self._get(key, field)
        if cached is not None:
            LOOKUPS.labels(kind, "hit").inc()
            return codec.decode(cached)
        if not self.redis_up:
            LOOKUPS.labels(kind, "error").inc()
            return await load()
        LOOKUPS.labels(kind, "miss").inc()
        lock = f"{key}#{field}:lock"
        owned = bool(await self._call(self._redis.set(lock, "1", nx=True, px=int(self._lock_ttl_s * 1000)), False))
        if owned:
            # Whoever held the lock before may have filled the key after our first look.
            cached = await self._get(key, field)
            if cached is not None:
                await self._call(self._redis.delete(lock), 0)
                return codec.decode(cached)
        else:
            # Another process is loading it: wait for its result rather than ask PostgreSQL too.
            deadline = time.monotonic() + self._lock_ttl_s
            while time.monotonic() < deadline and self.redis_up:
                await asyncio.sleep(_POLL_S)
                cached = await self._get(key, field)
                if cached is not None:
                    return codec.decode(cached)
        try:
            value = await load()
        except BaseException:
            if owned:
                await self._call(self._redis.delete(lock), 0)  # let the others load it
            raise
        ttl = ttl_s if value is not None or negative_ttl_s is None else negative_ttl_s
        await self._set(key, field, codec.encode(value), ttl, unlock=lock if owned else None)
        return value

    async def invalidate(self, *keys: str) -> None:
        await self._call(self._redis.delete(*keys), 0)

    async def _get(self, key: str, field: str) -> str | None:
        if not self.redis_up:
            return None
        raw = await self._call(self._redis.hget(key, field) if field else self._redis.get(key), None)
        return raw.decode() if isinstance(raw, bytes) else raw

    async def _set(self, key: str, field: str, value: str, ttl_s: float, unlock: str | None) -> None:
        """Fill the key and release our load lock, in one round trip."""
        ttl_ms = max(1, int(ttl_s * (1 - self._jitter * random.random()) * 1000))
        pipe = self._redis.pipeline(transaction=False)
        # A pipeline only queues commands here; execute() sends them together.
        if field:
            pipe.hset(key, field, value)  # type: ignore[unused-awaitable]
            pipe.pexpire(key, ttl_ms)  # type: ignore[unused-awaitable]
        else:
            pipe.set(key, value, px=ttl_ms)  # type: ignore[unused-awaitable]
        if unlock is not None:
            pipe.delete(unlock)  # type: ignore[unused-awaitable]
        await self._call(pipe.execute(), None)

    async def _call(self, command: Awaitable[T], fallback: T) -> T:
        if not self.redis_up:
            close = getattr(command, "close", None)
            if close is not None:
                close()
            return fallback
        try:
            async with asyncio.timeout(self._timeout_s):
                return await command
        except Exception as exc:
            if self.redis_up:
                logger.warning(
                    "Redis failed (%s: %s); reading from PostgreSQL for %.0fs", type(exc).__name__, exc, self._backoff_s
                )
            self._down_until = time.monotonic() + self._backoff_s
            return fallback
