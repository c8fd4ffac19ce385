"""Do-nothing round trips over a request path's hops: the least any request through them takes.

A benchmark's path crosses processes (Envoy, the rate-limit service, a
queue replica, an inference replica, Redis); each crossing costs time before
any of the services' own work. Calls that do next to nothing on the same
hops (a health check, a load report, a Redis ``PING``), measured in the same
run, show how much of a path's added time is that transport and how much the
services' work. They take turns, one call at a time, back to back: the
pacing that makes them fastest, so the floor is never overstated.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import grpc
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core.channels import insecure_channel
from sluice_devstack.stack import LocalStack

Call = Callable[[], Awaitable[object]]


async def round_trips_ms(calls: dict[str, Call], rounds: int = 200) -> dict[str, float]:
    """The median milliseconds of each call after a warm-up round, and their ``total``."""
    for call in calls.values():
        await call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            await call()
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: round(statistics.median(values), 2) for name, values in times.items()}
    return {**medians, "total": round(sum(medians.values()), 2)}


def health_check(channel: grpc.aio.Channel, api_key: str) -> Call:
    """A health check; through Envoy's edge listener it passes the rate-limit check (by API key) first."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    metadata = (("x-api-key", api_key),)
    return lambda: stub.Check(request, metadata=metadata, timeout=5)


def stream_opened(channel: grpc.aio.Channel) -> Call:
    """A stream opened and its first message read: health ``Watch`` answers at once with the current status.

    What a relay's hop costs before the relay does anything: a server stream
    in, one message out (the health service is not traced).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()

    async def call() -> None:
        stream = stub.Watch(request, timeout=5)
        async for _ in stream:
            break
        stream.cancel()

    return call


def load_report(channel: grpc.aio.Channel) -> Call:
    """An inference replica's ``GetLoad`` (reads counters): through Envoy's internal listener, a hop to inference."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GetLoadRequest()
    return lambda: stub.GetLoad(request, timeout=5)


def models_listed(http: aiohttp.ClientSession, api_key: str) -> Call:
    """OpenAI's ``GET /v1/models`` through the edge: its rate-limit check, the front, Envoy's internal
    listener and a queue replica (which finds the key in its cache and lists the model)."""
    headers = {"Authorization": f"Bearer {api_key}"}

    async def call() -> None:
        async with http.get("/v1/models", headers=headers) as response:
            await response.read()

    return call


def redis_ping(client: redis.Redis) -> Call:
    """One Redis round trip, as the scheduler makes to admit a request."""
    return client.ping


async def transport(stack: LocalStack, over_openai: bool = False) -> dict[str, float]:
    """What the hops the first token crosses beyond the bare engine cost with next to no work at their ends.

    The edge (Envoy, its rate-limit check, a queue replica; ``over_openai``:
    the same through OpenAI's front, as ``openai``), the scheduler's one Redis
    call and the internal hop (Envoy, an inference replica); see the functions
    above.
    """
    async with (
        redis.Redis.from_url(stack.redis_url) as client,
        insecure_channel(stack.edge) as edge,
        aiohttp.ClientSession(f"http://{stack.edge}") as http,
        stack.channel(stack.internal) as internal,
    ):
        first = (
            {"openai": models_listed(http, stack.demo_api_key)}
            if over_openai
            else {"edge": health_check(edge, stack.demo_api_key)}
        )
        return await round_trips_ms({**first, "inference": load_report(internal), "redis": redis_ping(client)})
