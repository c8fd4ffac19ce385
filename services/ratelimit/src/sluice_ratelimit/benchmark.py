"""``sluice bench ratelimit``: ShouldRateLimit against a bare EVALSHA, in the same run.

A private Redis and the rate-limit service (as its own process, as deployed)
are started on free ports. Then, from this process, ``--callers`` concurrent
callers each send requests back to back for ``--seconds``: first a bare
EVALSHA of the service's own script with one key (the floor: one Redis round
trip from Python), then ShouldRateLimit with 1 and with 3 descriptors. Limits
are set high so every decision goes to Redis. A last measurement calls a
Python gRPC server that answers ShouldRateLimit with a constant, doing
nothing: the ceiling any Python gRPC service has on this machine. Prints
decisions/s and p50/p99 latency of each, the ratios, and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis

from envoy_api.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy_api.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from sluice_core.healthcheck import check
from sluice_devstack.benchmarks import percentile
from sluice_devstack.processes import Process
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LOOPBACK, free_ports
from sluice_ratelimit import SERVICE_NAME
from sluice_ratelimit.limiter import Check, Limiter

HELP = "ShouldRateLimit against a bare EVALSHA"

CONFIG = """
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: method
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: tenant
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
"""


@dataclass(frozen=True)
class Figures:
    calls: int
    per_s: float
    p50_ms: float
    p99_ms: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement (default %(default)s)")


async def measure(call: Callable[[int], Awaitable[object]], callers: int, seconds: float) -> Figures:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(c: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await call(c * 1_000_000 + i)
            latencies.append(time.perf_counter() - start)
            i += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    wall = time.perf_counter() - began
    latencies.sort()
    return Figures(
        calls=len(latencies),
        per_s=round(len(latencies) / wall, 1),
        p50_ms=round(percentile(latencies, 0.5) * 1e3, 3),
        p99_ms=round(percentile(latencies, 0.99) * 1e3, 3),
    )


def rls_request(i: int, descriptors: int) -> rls_pb2.RateLimitRequest:
    entries = [
        ("api_key", f"key-{i % 1000}"),
        ("method", "/sluice.generation.v1.Generation/Generate"),
        ("tenant", f"t-{i % 100}"),
    ]
    return rls_pb2.RateLimitRequest(
        domain="bench",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)])
            for k, v in entries[:descriptors]
        ],
    )


async def run(args: argparse.Namespace) -> int:
    log = sys.stderr
    with tempfile.TemporaryDirectory(prefix="sluice-bench-rl-") as tmp:
        state = Path(tmp)
        redis_port, rls_port = free_ports(2)
        redis_server = RedisServer(redis_port, state / "redis")
        await redis_server.start()
        (state / "bench.yaml").write_text(CONFIG)
        env = {
            "SLUICE_RATELIMIT_PORT": str(rls_port),
            "SLUICE_RATELIMIT_REDIS_URL": redis_server.url,
            "SLUICE_RATELIMIT_CONFIG_PATHS": json.dumps([str(state / "bench.yaml")]),
            "SLUICE_RATELIMIT_LOG_LEVEL": "WARNING",
        }
        service = Process("ratelimit", [sys.executable, "-m", "sluice_ratelimit"], env, state / "ratelimit.log")
        noop_port = free_ports(1)[0]
        noop = Process(
            "noop", [sys.executable, "-m", "sluice_ratelimit.benchmark", str(noop_port)], {}, state / "noop.log"
        )
        redis = Redis.from_url(redis_server.url, max_connections=args.callers)
        try:
            target = f"{LOOPBACK}:{rls_port}"
            while not await check(target, SERVICE_NAME, 1.0):
                if service.returncode is not None:
                    raise RuntimeError(service.log_tail())
                await asyncio.sleep(0.1)
            limiter = Limiter(redis)

            async def evalsha(i: int) -> object:
                return await limiter.decide([Check(f"bench:{i % 1000}", 3600, 1_000_000_000, 1)])

            print(f"bare EVALSHA, {args.callers} callers ...", file=log, flush=True)
            await evalsha(0)  # loads the script
            bare = await measure(evalsha, args.callers, args.seconds)
            results: dict[str, Figures] = {"evalsha": bare}
            async with grpc.aio.insecure_channel(target) as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                for n in (1, 3):
                    print(f"ShouldRateLimit, {n} descriptor(s), {args.callers} callers ...", file=log, flush=True)

                    async def decide(i: int, n: int = n) -> object:
                        return await stub.ShouldRateLimit(rls_request(i, n))

                    results[f"should_rate_limit_{n}"] = await measure(decide, args.callers, args.seconds)
            async with grpc.aio.insecure_channel(f"{LOOPBACK}:{noop_port}") as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                await stub.ShouldRateLimit(rls_request(0, 1), wait_for_ready=True, timeout=30)
                print(f"a do-nothing Python gRPC server, {args.callers} callers ...", file=log, flush=True)

                async def nothing(i: int) -> object:
                    return await stub.ShouldRateLimit(rls_request(i, 1))

                results["grpc_noop"] = await measure(nothing, args.callers, args.seconds)
        finally:
            await redis.aclose()
            await noop.stop(5)
            await service.stop(10)
            await redis_server.stop()
    print(f"{'call':22} {'per s':>10} {'p50':>9} {'p99':>9}", file=log)
    for name, f in results.items():
        print(f"{name:22} {f.per_s:>10.1f} {f.p50_ms:>7.3f}ms {f.p99_ms:>7.3f}ms", file=log)
    comparison = {f"p50_ratio_{n}": round(results[f"should_rate_limit_{n}"].p50_ms / bare.p50_ms, 2) for n in (1, 3)}
    comparison["grpc_noop_p50_ratio"] = round(results["grpc_noop"].p50_ms / bare.p50_ms, 2)
    print(
        json.dumps(
            {
                "callers": args.callers,
                "seconds": args.seconds,
                **{k: asdict(v) for k, v in results.items()},
                "comparison": comparison,
            }
        )
    )
    return 0


class _Noop(rls_pb2_grpc.RateLimitServiceServicer):
    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


async def _serve_noop(port: int) -> None:
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(_Noop(), server)
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve_noop(int(sys.argv[1])))
