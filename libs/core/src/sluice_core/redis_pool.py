"""The services' Redis clients: a burst of calls waits for a free connection instead of failing.

redis-py's default pool fails every call beyond its connections at once ("Too
many connections"): under a flood of requests the queue's admissions failed
UNAVAILABLE and its slot releases were lost (the slots held for a lease).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis


def pooled_redis(url: str, connections: int, wait_s: float, **options: Any) -> Redis:
    """A client whose calls wait up to ``wait_s`` for one of ``connections``; ``options`` go to every connection."""
    return Redis.from_pool(BlockingConnectionPool.from_url(url, max_connections=connections, timeout=wait_s, **options))
