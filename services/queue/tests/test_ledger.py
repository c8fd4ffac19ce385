"""Usage drafts in a real Redis: a replica that stops is billed by another, and nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sluice.datastore.v1 import datastore_pb2
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.waiting import eventually
from sluice_queue.ledger import Ledger

LEASE_S = 0.3


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"{{test-{uuid.uuid4().hex[:8]}}}"


class Replica:
    """One queue replica's ledger, running, with the records it came to owe."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.ledger = Ledger(redis, prefix, interval_s=0.05, lease_s=LEASE_S)
        self.owed: list[datastore_pb2.UsageRecord] = []


@contextlib.asynccontextmanager
async def replica(redis: Redis, prefix: str) -> AsyncIterator[Replica]:
    running = Replica(redis, prefix)
    task = asyncio.create_task(running.ledger.run(running.owed.append))
    try:
        yield running
    finally:
        task.cancel()  # as a SIGKILL would: nothing more is mirrored
        with contextlib.suppress(asyncio.CancelledError):
            await task


def usage(request_id: str, completion_tokens: int, status: str = "lost") -> datastore_pb2.UsageRecord:
    return datastore_pb2.UsageRecord(request_id=request_id, completion_tokens=completion_tokens, status=status)


async def mirrored(redis: Redis, prefix: str, record: datastore_pb2.UsageRecord) -> None:
    """Until Redis holds ``record`` as its request's draft."""

    async def found() -> bool:
        return await redis.hget(f"{prefix}:usage:drafts", record.request_id) == record.SerializeToString()

    await eventually(found, 3, f"{record.request_id}'s draft in Redis")


async def owed_within(survivor: Replica, n: int) -> list[datastore_pb2.UsageRecord]:
    await eventually(lambda: len(survivor.owed) >= n, 3, f"{n} records owed to the survivor")
    return survivor.owed


async def test_a_stopped_replicas_running_requests_are_owed_by_another_as_last_mirrored(
    redis: Redis, prefix: str
) -> None:
    tokens = {"a": 0, "b": 0}
    async with replica(redis, prefix) as survivor:
        async with replica(redis, prefix) as dying:
            for request_id in tokens:
                dying.ledger.open(request_id, lambda r=request_id: usage(r, tokens[r]))  # type: ignore[misc]
            tokens["a"], tokens["b"] = 7, 3
            await mirrored(redis, prefix, usage("a", 7))
            await mirrored(redis, prefix, usage("b", 3))
        # Claimed only once the dead replica's leases have run out, each once.
        owed = await owed_within(survivor, 2)
        # Not synchronisation: two leases in which nobody claims them again (the survivor renews them now).
        await asyncio.sleep(2 * LEASE_S)
    assert sorted((r.request_id, r.completion_tokens) for r in owed) == [("a", 7), ("b", 3)]


async def test_a_settled_record_replaces_the_draft_and_a_written_one_is_gone(redis: Redis, prefix: str) -> None:
    async with replica(redis, prefix) as survivor:
        async with replica(redis, prefix) as dying:
            for request_id in ("written", "settled"):
                dying.ledger.open(request_id, lambda r=request_id: usage(r, 1))  # type: ignore[misc]
            dying.ledger.settle(usage("settled", 5, "stop"))
            dying.ledger.done(["written"])
            await mirrored(redis, prefix, usage("settled", 5, "stop"))
        owed = await owed_within(survivor, 1)
        await asyncio.sleep(2 * LEASE_S)  # not synchronisation: two leases in which nothing more is owed
    assert [(r.request_id, r.completion_tokens, r.status) for r in owed] == [("settled", 5, "stop")]


async def test_a_running_replicas_drafts_are_not_claimed(redis: Redis, prefix: str) -> None:
    async with replica(redis, prefix) as owner, replica(redis, prefix) as other:
        owner.ledger.open("running", lambda: usage("running", 1))
        await mirrored(redis, prefix, usage("running", 1))
        await asyncio.sleep(4 * LEASE_S)  # not synchronisation: four leases in which nobody claims it
    assert other.owed == [] and owner.owed == []


async def test_drafts_come_back_after_redis_lost_them(redis: Redis, prefix: str) -> None:
    async with replica(redis, prefix) as survivor:
        async with replica(redis, prefix) as dying:
            dying.ledger.open("r", lambda: usage("r", 2))
            await mirrored(redis, prefix, usage("r", 2))
            await redis.delete(f"{prefix}:usage:drafts", f"{prefix}:usage:due")  # as an empty restart leaves it
            await mirrored(redis, prefix, usage("r", 2))  # the next full update writes it again
        owed = await owed_within(survivor, 1)
    assert [r.request_id for r in owed] == ["r"]


async def test_a_replica_cancelled_while_it_writes_to_redis_stops(redis_server: RedisServer, prefix: str) -> None:
    # redis-py lost a cancellation that landed mid-write (as a ConnectionError, or not at all): the
    # ledger carried on, and the task that should have stopped ran on, within a few tries of this.
    for _ in range(30):
        client = Redis.from_url(redis_server.url)
        ledger = Ledger(client, prefix, interval_s=0.005, lease_s=LEASE_S)
        ledger.open("a", lambda: usage("a", 1))
        task = asyncio.create_task(ledger.run(lambda _: None))
        await asyncio.sleep(random.uniform(0, 0.03))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert done, "the ledger outlived its cancellation"
        await client.aclose()
