"""The cache's shared loads, on real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from redis.asyncio import Redis

from sluice_datastore.cache import Cache, Codec
from sluice_devstack.redis_server import RedisServer


def _encode(value: str | None) -> str:
    return value or ""


def _decode(text: str) -> str | None:
    return text or None


TEXT = Codec(_encode, _decode)


async def test_a_caller_leaving_does_not_fail_the_others_waiting_for_the_same_load(redis_server: RedisServer) -> None:
    loads = 0
    loading, answer = asyncio.Event(), asyncio.Event()

    async def load() -> str | None:
        nonlocal loads
        loads += 1
        loading.set()
        await answer.wait()
        return "the tenant"

    async with Redis.from_url(redis_server.url) as redis:
        cache = Cache(redis)
        key = f"test:{uuid.uuid4().hex}"

        async def lookup() -> str | None:
            return await cache.get_or_load("tenant", key, load, TEXT, ttl_s=60)

        first, second = asyncio.create_task(lookup()), asyncio.create_task(lookup())
        await loading.wait()
        first.cancel()  # its caller went away (or its deadline passed)
        with contextlib.suppress(asyncio.CancelledError):
            await first
        answer.set()
        assert await second == "the tenant"
        assert loads == 1
        assert await lookup() == "the tenant"  # filled, not lost
        assert loads == 1
