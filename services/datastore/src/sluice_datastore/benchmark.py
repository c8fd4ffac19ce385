"""``sluice bench datastore``: hot (cache), cold (PostgreSQL) and unindexed, in the same run.

A private PostgreSQL and Redis are started and seeded like the query-plan
test (100,000 messages in 1,000 conversations, 100,000 usage records, 10,000
API keys); the data-access service runs as its own process. One caller, one
request at a time (latency, not throughput), measures over gRPC:

- ``GetTenantByApiKey`` hot (the same key again: this process's memory) and
  cold (a key never asked for: Redis misses, PostgreSQL answers);
- ``GetConversation`` for the newest 20 messages, hot (cached) and cold (a
  conversation not read before);

and, on PostgreSQL connections, the newest-20 and tenant-by-key queries with
their indexes and with index scans switched off (what they cost without the
index). Also the in-process tenant lookup alone, in microseconds.
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
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc

from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_core.healthcheck import check
from sluice_datastore import SERVICE_NAME
from sluice_datastore.database import NEWEST_MESSAGES, TENANT_BY_KEY
from sluice_datastore.invalidation import LocalTenants
from sluice_datastore.migrate import migrate
from sluice_datastore.plans import seed
from sluice_datastore.records import TenantRecord
from sluice_datastore.store import hash_key
from sluice_devstack.benchmarks import percentile
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.processes import Process
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LOOPBACK, free_ports

HELP = "cached, cold and unindexed data access"


@dataclass(frozen=True)
class Figures:
    calls: int
    p50_ms: float
    p99_ms: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=500, help="calls per measurement (default %(default)s)")


async def measure(call: Callable[[int], Awaitable[object]], calls: int) -> Figures:
    latencies = []
    for i in range(calls):
        start = time.perf_counter()
        await call(i)
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    return Figures(calls, round(percentile(latencies, 0.5) * 1e3, 4), round(percentile(latencies, 0.99) * 1e3, 4))


async def run(args: argparse.Namespace) -> int:
    log = sys.stderr
    calls = args.calls
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-ds-") as tmp:
        state = Path(tmp)
        pg_port, redis_port, service_port = free_ports(3)
        postgres = PostgresServer(pg_port, state / "postgres", durable=False)
        redis_server = RedisServer(redis_port, state / "redis")
        await postgres.start()
        await redis_server.start()
        service: Process | None = None
        connection = await asyncpg.connect(postgres.url)
        try:
            print("seeding 100,000 messages, 100,000 usage records, 10,000 keys ...", file=log, flush=True)
            await migrate(connection)
            await seed(connection)
            conversations = [
                (r["id"], r["tenant_id"])
                for r in await connection.fetch("SELECT id::text, tenant_id::text FROM conversations")
            ]
            env = {
                "SLUICE_DATASTORE_PORT": str(service_port),
                "SLUICE_DATASTORE_DATABASE_URL": postgres.url,
                "SLUICE_DATASTORE_REDIS_URL": redis_server.url,
                "SLUICE_DATASTORE_LOG_LEVEL": "WARNING",
            }
            service = Process("datastore", [sys.executable, "-m", "sluice_datastore"], env, state / "datastore.log")
            target = f"{LOOPBACK}:{service_port}"
            while not await check(target, SERVICE_NAME, 1.0):
                if service.returncode is not None:
                    raise RuntimeError(service.log_tail())
                await asyncio.sleep(0.1)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = datastore_pb2_grpc.DataStoreStub(channel)

                async def tenant(i: int) -> object:
                    return await stub.GetTenantByApiKey(
                        datastore_pb2.GetTenantByApiKeyRequest(api_key=f"plans-key-{i}")
                    )

                async def hot_tenant(i: int) -> object:
                    return await tenant(1)

                async def conversation(i: int) -> object:
                    conversation_id, tenant_id = conversations[i]
                    request = datastore_pb2.GetConversationRequest(
                        conversation_id=conversation_id, tenant_id=tenant_id, limit=20
                    )
                    return [m async for m in stub.GetConversation(request)]

                async def hot_conversation(i: int) -> object:
                    return await conversation(0)

                print("GetTenantByApiKey and GetConversation, cold and hot ...", file=log, flush=True)
                for _ in range(50):  # warm the connection and this client
                    await hot_tenant(0)
                    await hot_conversation(0)
                results["tenant_cold"] = await measure(lambda i: tenant(1000 + i), min(calls, 9000))
                results["tenant_hot"] = await measure(hot_tenant, calls)
                results["conversation_cold"] = await measure(
                    lambda i: conversation(1 + i), min(calls, len(conversations) - 1)
                )
                results["conversation_hot"] = await measure(hot_conversation, calls)

            print("the newest-20 query on PostgreSQL, with and without its index ...", file=log, flush=True)

            async def newest(i: int) -> object:
                return await connection.fetch(NEWEST_MESSAGES, conversations[i % len(conversations)][0], 20)

            results["query_indexed"] = await measure(newest, calls)
            # A session that may not use index scans: the same query, as if the index were missing.
            no_index = {"enable_indexscan": "off", "enable_bitmapscan": "off", "enable_indexonlyscan": "off"}
            unindexed = await asyncpg.connect(postgres.url, server_settings=no_index)

            async def newest_unindexed(i: int) -> object:
                return await unindexed.fetch(NEWEST_MESSAGES, conversations[i % len(conversations)][0], 20)

            results["query_unindexed"] = await measure(newest_unindexed, min(calls, 100))
            await unindexed.close()

            async def key_indexed(i: int) -> object:
                return await connection.fetch(TENANT_BY_KEY, hash_key(f"plans-key-{i}"))

            results["tenant_query_indexed"] = await measure(key_indexed, calls)
            unindexed = await asyncpg.connect(postgres.url, server_settings=no_index)

            async def key_unindexed(i: int) -> object:
                return await unindexed.fetch(TENANT_BY_KEY, hash_key(f"plans-key-{i}"))

            results["tenant_query_unindexed"] = await measure(key_unindexed, min(calls, 100))
            await unindexed.close()

            local = LocalTenants(60.0)
            local.subscribed.set()
            record = TenantRecord("t", "n", 1, 1, 0, 0, datetime.now(UTC))
            local.put(hash_key("plans-key-1"), record)

            async def in_process(i: int) -> object:
                return local.get(hash_key("plans-key-1"))

            results["tenant_in_process"] = await measure(in_process, calls)
        finally:
            await connection.close()
            if service is not None:
                await service.stop(10)
            await redis_server.stop()
            await postgres.stop()
            postgres.remove_data()
    print(f"{'call':22} {'p50':>10} {'p99':>10}", file=log)
    for name, f in results.items():
        print(f"{name:22} {f.p50_ms:>8.3f}ms {f.p99_ms:>8.3f}ms", file=log)
    comparison = {
        "tenant_hot_p50_ms": results["tenant_hot"].p50_ms,
        "tenant_in_process_p50_us": round(results["tenant_in_process"].p50_ms * 1e3, 2),
        "conversation_cold_p50_ms": results["conversation_cold"].p50_ms,
        "newest_20_unindexed_over_indexed_p50": round(
            results["query_unindexed"].p50_ms / results["query_indexed"].p50_ms, 1
        ),
        "tenant_unindexed_over_indexed_p50": round(
            results["tenant_query_unindexed"].p50_ms / results["tenant_query_indexed"].p50_ms, 1
        ),
    }
    print(json.dumps({**{k: asdict(v) for k, v in results.items()}, "comparison": comparison}))
    return 0
