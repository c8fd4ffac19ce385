"""Keeping every process's caches coherent: writers publish what changed, every process listens.

Tenants are also kept in each process's memory, for a few seconds, so that a
hot key is answered without even a Redis round trip. A revoked key must stop
working everywhere within a second, so that memory is trusted only while this
process is subscribed to the invalidation channel: when the subscription
breaks (Redis down), the memory is emptied and not used until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from sluice_core.service import raise_if_cancelled
from sluice_datastore.records import TenantRecord

logger = logging.getLogger(__name__)

CHANNEL = "sluice:datastore:invalidate"
_RETRY_S = 0.5


class LocalTenants:
    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[bytes, tuple[float, TenantRecord | None]] = {}
        self.subscribed = asyncio.Event()

    def get(self, key_hash: bytes) -> tuple[bool, TenantRecord | None]:
        """(found, tenant): found is False when this process does not know the key (or may not trust itself)."""
        if not self.subscribed.is_set():
            return False, None
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, key_hash: bytes, tenant: TenantRecord | None, ttl_s: float | None = None) -> None:
        if self.subscribed.is_set():
            self._entries[key_hash] = (time.monotonic() + min(ttl_s or self._ttl_s, self._ttl_s), tenant)

    def drop(self, key_hash: bytes) -> None:
        self._entries.pop(key_hash, None)

    async def listen(self, redis: Redis) -> None:
        """Drop entries other processes changed; forever, resubscribing after failures."""
        while True:
            pubsub = redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self.drop(bytes.fromhex(message["data"].decode()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()
                if self.subscribed.is_set():
                    logger.warning(
                        "invalidation channel lost (%s); not caching tenants in memory until it is back", exc
                    )
            finally:
                self.subscribed.clear()
                self._entries.clear()
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(_RETRY_S)


async def publish(redis: Redis, key_hash: bytes, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await redis.publish(CHANNEL, key_hash.hex())
    except Exception:
        return False
    return True
