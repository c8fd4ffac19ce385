"""The shared scheduler against a real Redis: order, fairness, caps, leases, several replicas."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sluice.generation.v1 import generation_pb2
from sluice_core.errors import ResourceExhausted, Unavailable
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import free_ports
from sluice_devstack.waiting import eventually
from sluice_queue.scheduler import Scheduler, SchedulerConfig, Ticket, connect

INTERACTIVE, BATCH = generation_pb2.PRIORITY_INTERACTIVE, generation_pb2.PRIORITY_BATCH
_ids = itertools.count()


@contextlib.asynccontextmanager
async def running(url: str, config: SchedulerConfig, slots: int) -> AsyncIterator[Scheduler]:
    """A scheduler (one queue replica's) with its loops running, over ``slots`` engine slots."""
    redis = Redis.from_url(url)
    scheduler = Scheduler(redis, config)
    await scheduler.report_engines({"engine": slots})
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()


@pytest.fixture
def config() -> SchedulerConfig:
    """Fresh keys for every test; no interactive reserve (tested on its own), so every slot is anyone's."""
    return SchedulerConfig(
        prefix=f"{{test-{uuid.uuid4().hex[:8]}}}", lease_s=0.6, position_interval_s=0.05, interactive_reserve=0.0
    )


async def enter(
    scheduler: Scheduler, tenant: str, priority: generation_pb2.Priority.ValueType = BATCH, weight: int = 1
) -> Ticket:
    return await scheduler.enter(f"{tenant}-{next(_ids)}", tenant, weight, priority)


async def admitted(ticket: Ticket, within_s: float = 2.0) -> None:
    async def wait() -> None:
        async for _ in ticket.positions():
            pass

    await asyncio.wait_for(wait(), within_s)


async def test_free_slots_admit_at_once_then_callers_wait(redis_server: RedisServer, config: SchedulerConfig) -> None:
    async with running(redis_server.url, config, slots=2) as scheduler:
        first, second, third = [await enter(scheduler, "t") for _ in range(3)]
        assert first.admitted and second.admitted and not third.admitted
        await first.release()
        await admitted(third)


async def test_interactive_goes_before_waiting_batch(redis_server: RedisServer, config: SchedulerConfig) -> None:
    async with running(redis_server.url, config, slots=1) as scheduler:
        running_now = await enter(scheduler, "batchy")
        batch = [await enter(scheduler, "batchy") for _ in range(5)]
        interactive = await enter(scheduler, "chatty", INTERACTIVE)
        await running_now.release()
        await admitted(interactive)
        assert not any(t.admitted for t in batch)


async def test_batch_leaves_the_reserve_to_interactive_requests(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, dataclasses.replace(config, interactive_reserve=0.25), slots=8) as scheduler:
        flood = [await enter(scheduler, "flood") for _ in range(8)]
        assert [t.admitted for t in flood] == [True] * 6 + [False] * 2
        chats = [await enter(scheduler, "chat", INTERACTIVE) for _ in range(3)]
        assert [t.admitted for t in chats] == [True, True, False]  # two straight into the reserve
        await flood[0].release()
        await admitted(chats[2])  # the free slot goes to the interactive request
        await chats[0].release()
        await chats[1].release()
        await asyncio.sleep(0.2)  # not synchronisation: four dispatch intervals that must admit no batch request
        assert not flood[6].admitted  # two slots free: both kept for interactive work
        await flood[1].release()
        await admitted(flood[6])
        assert not flood[7].admitted


async def test_waiters_are_told_when_their_position_changes(redis_server: RedisServer, config: SchedulerConfig) -> None:
    async with running(redis_server.url, config, slots=1) as scheduler:
        holder = await enter(scheduler, "a")
        waiter = await enter(scheduler, "a")
        told: list[int] = []

        async def follow() -> None:
            async for position in waiter.positions():
                told.append(position)

        following = asyncio.create_task(follow())
        await eventually(lambda: told == [1], 2, "the waiter told it is next")
        await enter(scheduler, "b", INTERACTIVE)  # jumps ahead
        await eventually(lambda: told == [1, 2], 2, "the waiter told it is second")
        await holder.release()  # the interactive one runs; the waiter is next again
        await eventually(lambda: told == [1, 2, 1], 2, "the waiter told it is next again")
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following


async def test_waiters_far_back_are_told_of_their_moves_less_often(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, dataclasses.replace(config, position_interval_s=0.1), slots=1) as scheduler:
        holder = await enter(scheduler, "a")
        waiters = [await enter(scheduler, "a") for _ in range(10)]
        told: dict[Ticket, list[int]] = {w: [] for w in waiters}

        async def follow(waiter: Ticket) -> None:
            async for position in waiter.positions():
                told[waiter].append(position)

        following = [asyncio.create_task(follow(w)) for w in waiters]
        await eventually(
            lambda: [t[-1:] for t in told.values()] == [[p] for p in range(1, 11)], 2, "each waiter told its place"
        )
        await holder.release()
        front, back = waiters[1], waiters[-1]
        # One wave ahead: told within the interval.
        await eventually(lambda: told[front] == [2, 1], 2, "the front waiter told it moved")
        assert told[back] == [10]  # nine waves ahead: told within nine intervals
        await eventually(lambda: told[back] == [10, 9], 2, "the last waiter told it moved")
        for task in following:
            task.cancel()
        for task in following:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_tenants_weighted_one_to_three_share_slots_one_to_three(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, config, slots=4) as scheduler:
        holders = [await enter(scheduler, "filler") for _ in range(4)]
        waiting = {await enter(scheduler, "light", weight=1): "light" for _ in range(100)}
        waiting |= {await enter(scheduler, "heavy", weight=3): "heavy" for _ in range(100)}
        served: Counter[str] = Counter()
        # Saturated: each time a slot frees, whoever is admitted next takes it.
        for _ in range(80):
            await holders.pop(0).release()
            await eventually(lambda: any(t.admitted for t in waiting), 2, "a waiter admitted")
            for ticket in [t for t in waiting if t.admitted]:
                served[waiting.pop(ticket)] += 1
                holders.append(ticket)
        assert served["heavy"] / served["light"] == pytest.approx(3, rel=0.1)


async def test_full_lines_shed_with_a_retry_hint(redis_server: RedisServer, config: SchedulerConfig) -> None:
    capped = SchedulerConfig(prefix=config.prefix, max_waiting_per_tenant=2, max_waiting_per_class=3)
    async with running(redis_server.url, capped, slots=1) as scheduler:
        await enter(scheduler, "a")
        await enter(scheduler, "a")
        await enter(scheduler, "a")
        with pytest.raises(ResourceExhausted, match="tenant's waiting line is full") as tenant_full:
            await enter(scheduler, "a")
        assert tenant_full.value.retry_after_s == capped.retry_after_s
        await enter(scheduler, "b")
        with pytest.raises(ResourceExhausted, match="class's waiting line is full"):
            await enter(scheduler, "c")
        await enter(scheduler, "c", INTERACTIVE)  # the other class has room


async def test_a_waiter_that_leaves_frees_its_place_at_once(redis_server: RedisServer, config: SchedulerConfig) -> None:
    async with running(redis_server.url, config, slots=1) as scheduler:
        holder = await enter(scheduler, "a")
        gone, next_one = await enter(scheduler, "a"), await enter(scheduler, "a")
        await gone.release()
        await holder.release()
        await admitted(next_one)
        assert not gone.admitted


async def test_a_dead_replicas_slots_come_back_within_the_lease(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, config, slots=2) as survivor:
        async with running(redis_server.url, config, slots=2) as doomed:
            for _ in range(2):
                assert (await enter(doomed, "a")).admitted
            waiter = await enter(survivor, "a")
        # The doomed replica stopped renewing without giving anything back.
        start = time.monotonic()
        await admitted(waiter, within_s=config.lease_s + 1.5)
        assert time.monotonic() - start <= config.lease_s + 1.0


async def test_two_replicas_never_hand_out_more_than_the_capacity(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    slots = 3
    holding = peak = 0
    async with running(redis_server.url, config, slots) as one, running(redis_server.url, config, slots) as two:

        async def client(scheduler: Scheduler, i: int) -> None:
            nonlocal holding, peak
            ticket = await enter(scheduler, f"tenant{i % 3}", INTERACTIVE if i % 4 == 0 else BATCH)
            await admitted(ticket, within_s=20)
            holding += 1
            peak = max(peak, holding)
            await asyncio.sleep(0.01)  # not synchronisation: the slot is held a while, as a request holds it
            holding -= 1
            await ticket.release()

        await asyncio.gather(*(client((one, two)[i % 2], i) for i in range(60)))
    assert peak == slots


async def test_an_admission_while_the_caller_handles_a_position_is_not_lost(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, config, slots=1) as scheduler:
        holder = await enter(scheduler, "a")
        waiter = await enter(scheduler, "a")
        positions = waiter.positions()
        assert await anext(positions) == 1  # the caller is now busy sending this position on
        await holder.release()
        await eventually(lambda: waiter.admitted, 2, "the waiter admitted")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(positions), 1)


async def test_without_redis_new_requests_are_unavailable(config: SchedulerConfig) -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_ports(1)[0]}/0", socket_connect_timeout=0.5)
    try:
        with pytest.raises(Unavailable, match="queue is unreachable") as caught:
            await enter(Scheduler(redis, config), "a")
        assert caught.value.retry_after_s == config.retry_after_s
    finally:
        await redis.aclose()


async def test_a_running_request_whose_lease_vanished_keeps_its_slot(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, config, slots=2) as scheduler:
        first, second = [await enter(scheduler, "a") for _ in range(2)]
        assert first.admitted and second.admitted
        async with Redis.from_url(redis_server.url) as redis:
            await redis.delete(f"{config.prefix}:leases")  # Redis lost its data, say

            async def renewed() -> bool:
                return bool(await redis.zcard(f"{config.prefix}:leases") == 2)

            await eventually(renewed, config.lease_s, "both leases renewed within the lease")
        assert not (await enter(scheduler, "a")).admitted  # both slots are still taken


async def test_a_released_slot_is_not_brought_back_by_a_renewal_already_under_way(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, config, slots=1) as scheduler:
        ticket = await enter(scheduler, "a")
        await ticket.release()
        # A renewal that listed it before the release reaches Redis after it.
        await scheduler._call("renew", config.lease_ms, config.lease_ms, 1, ticket.request_id)
        assert (await enter(scheduler, "a")).admitted


async def test_positions_follow_the_order_of_service_when_passes_tie(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, dataclasses.replace(config, position_interval_s=10), slots=1) as scheduler:
        holder = await enter(scheduler, "blocker")
        waiters = [await enter(scheduler, "a") for _ in range(3)]
        await holder.release()
        await admitted(waiters[0])  # "a" served once: its pass is 1
        waiters += [await enter(scheduler, "b") for _ in range(3)]  # "b" starts at 0, then ties with "a"
        answer = await scheduler._call("tick", config.lease_ms, 100)
        assert isinstance(answer, list)
        told = [r.decode() for r in answer]
        served: list[str] = []
        current = waiters[0]

        def another_admitted() -> bool:
            return any(t.admitted and t.request_id not in served for t in waiters[1:])

        for _ in told:
            await current.release()
            await eventually(another_admitted, 2, "the next waiter admitted")
            current = next(t for t in waiters[1:] if t.admitted and t.request_id not in served)
            served.append(current.request_id)
        assert told == served


async def test_a_line_that_empties_leaves_no_counts_and_nothing_without_an_expiry(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    async with running(redis_server.url, config, slots=1) as scheduler:
        tickets = [await enter(scheduler, tenant) for tenant in ("a", "b", "a")]
        await scheduler.report_engines({"engine": 1})
        for ticket in tickets:
            await ticket.release()
        async with Redis.from_url(redis_server.url) as redis:
            assert await redis.hgetall(f"{config.prefix}:count") == {}
            # Replicas that crash leave their keys: each one expires, whatever is in it.
            for key in await redis.keys(f"{config.prefix}:*"):
                assert await redis.pttl(key) > 0, key


async def test_a_burst_of_calls_beyond_the_connection_pool_waits_instead_of_failing(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    redis = connect(redis_server.url, timeout_s=2.0, connections=8)
    scheduler = Scheduler(redis, config)
    try:
        await scheduler.report_engines({"engine": 1000})
        tickets = await asyncio.gather(*(enter(scheduler, f"t{i % 7}") for i in range(300)))
        assert all(ticket.admitted for ticket in tickets)
        await asyncio.gather(*(ticket.release() for ticket in tickets))
    finally:
        await redis.aclose()


async def test_after_redis_restarts_empty_no_call_fails_on_a_dead_connection(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    # Each pooled connection to the old Redis failed once, whenever load next reached it.
    redis = connect(redis_server.url, timeout_s=2.0, connections=8)
    scheduler = Scheduler(redis, config)
    try:
        await scheduler.report_engines({"engine": 100})
        tickets = await asyncio.gather(*(enter(scheduler, "t") for _ in range(16)))  # every connection opened
        await asyncio.gather(*(ticket.release() for ticket in tickets))
        await redis_server.stop()
        await redis_server.start()
        await scheduler.report_engines({"engine": 100})
        for _ in range(3):
            tickets = await asyncio.gather(*(enter(scheduler, "t") for _ in range(16)))
            assert all(ticket.admitted for ticket in tickets)
            await asyncio.gather(*(ticket.release() for ticket in tickets))
    finally:
        await redis.aclose()


async def test_an_enter_sent_twice_is_counted_once(redis_server: RedisServer, config: SchedulerConfig) -> None:
    # What a call resent after its connection broke does: the request keeps one place.
    async with running(redis_server.url, config, slots=1) as scheduler:
        first = await enter(scheduler, "a")
        waiting = await scheduler.enter("twice", "b", 1, BATCH)
        again = await scheduler.enter("twice", "b", 1, BATCH)
        assert (first.admitted, waiting.admitted, again.admitted) == (True, False, False)
        redis = Redis.from_url(redis_server.url)
        try:
            assert await redis.hget(f"{config.prefix}:count", "tenant:b") == b"1"
        finally:
            await redis.aclose()
        await first.release()
        await admitted(again)


async def test_a_stalled_redis_refuses_requests_within_the_timeout(
    redis_server: RedisServer, config: SchedulerConfig
) -> None:
    redis = connect(redis_server.url, timeout_s=0.3, connections=4)
    scheduler = Scheduler(redis, config)
    assert redis_server.process is not None
    try:
        await scheduler.report_engines({"engine": 10})
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(Unavailable, match="queue is unreachable"):
                await enter(scheduler, "a")
            assert time.monotonic() - start < 2.0, "a stall waited for redis-py's own 5 s"
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert (await enter(scheduler, "a")).admitted
    finally:
        await redis.aclose()
