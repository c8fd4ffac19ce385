"""The shared queue end to end: two queue replicas, Redis, Envoy and the engines, saturated on purpose.

The test stack gives each inference replica 4 slots (``SLOTS_PER_REPLICA``),
so a few dozen requests saturate it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import grpc
import pytest
from redis.asyncio import Redis

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_client import GenerationClient, GenerationStream, StreamError
from sluice_core.errors import ResourceExhausted
from sluice_devstack.stack import LocalStack
from sluice_devstack.waiting import eventually

from .conftest import SLOTS_PER_REPLICA, WAITING_PER_TENANT, tenant_with_key

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def request(max_tokens: int, priority: int = generation_pb2.PRIORITY_BATCH) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return generation_pb2.GenerateRequest(prompt="The river", sampling=sampling, priority=priority)  # type: ignore[arg-type]


@dataclass
class Outcome:
    ttft_s: float
    finished: generation_pb2.Finished | None
    positions: list[int]
    error: StreamError | None = None


async def call(client: GenerationClient, req: generation_pb2.GenerateRequest, deadline_s: float = 120) -> Outcome:
    start = time.perf_counter()
    ttft, positions, finished = 0.0, [], None
    try:
        async for event in client.generate(req, timeout=deadline_s):
            if event.HasField("queued"):
                positions.append(event.queued.position)
            elif event.HasField("delta") and not ttft:
                ttft = time.perf_counter() - start
            elif event.HasField("finished"):
                finished = event.finished
    except StreamError as exc:
        return Outcome(ttft, None, positions, exc)
    return Outcome(ttft, finished, positions)


async def engine_loads(stack: LocalStack) -> list[inference_pb2.Load]:
    loads = []
    for index in range(len(stack.ports.inference)):
        async with stack.channel(stack.inference_address(index)) as channel:
            try:
                loads.append(await inference_pb2_grpc.InferenceStub(channel).GetLoad(inference_pb2.GetLoadRequest()))
            except grpc.aio.AioRpcError:
                pass  # not started (yet)
    return loads


def queue_keys(stack: LocalStack) -> str:
    return f"{{sluice-queue-{stack.ports.edge}}}"


async def fill_every_slot(stack: LocalStack, client: GenerationClient) -> list[GenerationStream]:
    """Long interactive streams holding every slot, each already producing tokens."""
    capacity = SLOTS_PER_REPLICA * len(await engine_loads(stack))
    streams = [client.generate(request(1500, generation_pb2.PRIORITY_INTERACTIVE)) for _ in range(capacity)]
    for stream in streams:
        async for event in stream:
            if event.HasField("delta"):
                break
    return streams


async def test_interactive_waits_one_slot_turnover_behind_a_batch_flood_and_engines_never_overflow(
    stack: LocalStack,
) -> None:
    capacity = SLOTS_PER_REPLICA * len(await engine_loads(stack))
    _, flood_key = await tenant_with_key(stack, "flood")
    peak = 0
    watching = True

    async def watch_engines() -> None:
        nonlocal peak
        while watching:
            peak = max(peak, sum(load.running + load.waiting for load in await engine_loads(stack)))
            await asyncio.sleep(0.01)  # not synchronisation: the sampling interval of the peak

    watcher = asyncio.create_task(watch_engines())
    async with (
        GenerationClient(stack.edge, api_key=flood_key) as flood,
        GenerationClient(stack.edge, api_key=stack.demo_api_key) as chat,
    ):
        batch = [asyncio.create_task(call(flood, request(96))) for _ in range(3 * capacity)]

        async def saturated() -> bool:
            async with Redis.from_url(stack.redis_url) as redis:
                return bool(await redis.zcard(f"{queue_keys(stack)}:alive") >= capacity)

        await eventually(saturated, 30, "batch requests waiting")
        interactive, expired = await asyncio.gather(
            call(chat, request(8, generation_pb2.PRIORITY_INTERACTIVE)),
            call(flood, request(8), deadline_s=0.3),  # behind its own tenant's flood
        )
        flooded = await asyncio.gather(*batch)
    watching = False
    await watcher

    assert all(o.finished is not None for o in flooded), [o.error for o in flooded if o.error]
    service_s = [(o.finished.timings.total_ms - o.finished.timings.queue_ms) / 1e3 for o in flooded if o.finished]
    assert max(o.finished.timings.queue_ms for o in flooded if o.finished) / 1e3 > max(service_s), "no flood"
    # It waited at most for the next slot to come free: one slot turnover, a batch
    # request's run plus the handover to the next request (a quarter on top here,
    # on two busy cores); its own time to first token, once admitted, comes after.
    assert interactive.finished is not None
    waited_s = interactive.finished.timings.queue_ms / 1e3
    assert waited_s <= 1.25 * max(service_s), (waited_s, sorted(service_s))
    assert peak <= capacity, f"engines held {peak} requests with {capacity} slots"
    assert expired.error is not None and expired.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    positions = [p for o in flooded for p in o.positions]
    assert positions and max(positions) >= capacity, "waiters are told their place"
    async with Redis.from_url(stack.redis_url) as redis:
        assert await redis.zcard(f"{queue_keys(stack)}:alive") == 0, "the expired request left the line"


async def test_a_full_line_sheds_with_a_retry_hint(stack: LocalStack) -> None:
    _, key = await tenant_with_key(stack, "greedy")
    async with (
        GenerationClient(stack.edge, api_key=stack.demo_api_key) as blocker,
        GenerationClient(stack.edge, api_key=key) as client,
    ):
        blockers = await fill_every_slot(stack, blocker)  # nothing leaves the line meanwhile
        calls = [asyncio.create_task(call(client, request(8))) for _ in range(WAITING_PER_TENANT + 6)]

        async def six_refused() -> bool:
            return sum(c.done() for c in calls) >= 6

        await eventually(six_refused, 30, "the requests beyond the tenant's cap refused")
        for stream in blockers:
            stream.cancel()
        outcomes = await asyncio.gather(*calls)
    shed = [o.error for o in outcomes if o.error is not None]
    assert len(shed) == 6, [str(e) for e in shed]
    for error in shed:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(error.error, ResourceExhausted) and error.error.retry_after_s
    assert sum(o.finished is not None for o in outcomes) == WAITING_PER_TENANT, "the ones in line were served"


async def test_a_killed_queue_replicas_slots_come_back_within_the_lease(stack: LocalStack) -> None:
    leases = f"{queue_keys(stack)}:leases"
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        # As many streams as slots: Envoy spreads them over both queue replicas.
        capacity = SLOTS_PER_REPLICA * len(await engine_loads(stack))
        streams = [client.generate(request(1500), timeout=60) for _ in range(capacity)]
        for stream in streams:
            async for event in stream:
                if event.HasField("delta"):
                    break
        stack.process("queue-1").signal_group(signal.SIGKILL)
        for stream in streams:
            stream.cancel()
    async with Redis.from_url(stack.redis_url) as redis:

        async def freed() -> bool:
            seconds, micros = await redis.time()
            live = await redis.zcount(leases, f"({seconds * 1000 + micros // 1000}", "+inf")
            return bool(live == 0)

        # Lease time 3 s (the default), plus one renewal's worth of slack.
        assert await eventually(freed, 5.0, "the dead replica's leases expired") <= 4.5
    await stack.process("queue-1").stop(grace_s=0)
    stack.start_queue(0)
    await stack.wait_ready(replicas=len(await engine_loads(stack)))


async def test_tenants_weighted_one_to_three_share_the_slots_one_to_three(stack: LocalStack) -> None:
    capacity = SLOTS_PER_REPLICA * len(await engine_loads(stack))
    _, light_key = await tenant_with_key(stack, "light", weight=1)
    _, heavy_key = await tenant_with_key(stack, "heavy", weight=3)
    started: list[str] = []

    async def flood(client: GenerationClient, name: str) -> None:
        async for event in client.generate(request(16), timeout=120):
            if event.HasField("started"):
                started.append(name)

    async with (
        GenerationClient(stack.edge, api_key=stack.demo_api_key) as blocker,
        GenerationClient(stack.edge, api_key=light_key) as light,
        GenerationClient(stack.edge, api_key=heavy_key) as heavy,
    ):
        # Every slot busy, so that both floods are queued before the first is served.
        blockers = await fill_every_slot(stack, blocker)
        per_tenant = WAITING_PER_TENANT
        floods = [asyncio.create_task(flood(c, n)) for c, n in ((light, "light"), (heavy, "heavy"))
                  for _ in range(per_tenant)]  # fmt: skip

        async def all_waiting() -> bool:
            async with Redis.from_url(stack.redis_url) as redis:
                return bool(await redis.zcard(f"{queue_keys(stack)}:alive") == 2 * per_tenant)

        await eventually(all_waiting, 30, "both floods queued")
        for stream in blockers:
            stream.cancel()
        await asyncio.gather(*floods)
    # While both had requests waiting: after the first wave (the slots the blockers
    # freed all at once) until the heavy tenant's last request started.
    saturated = started[capacity : len(started) - started[::-1].index("heavy")]
    share = saturated.count("heavy") / saturated.count("light")
    assert share == pytest.approx(3, rel=0.1), saturated
