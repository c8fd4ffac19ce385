"""A private PostgreSQL (statements logged, to count them), migrated; the data-access service in process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_datastore import SERVICE_NAME
from sluice_datastore.cache import Cache
from sluice_datastore.database import Database
from sluice_datastore.invalidation import LocalTenants
from sluice_datastore.servicer import DataStoreServicer
from sluice_datastore.settings import DataStoreSettings
from sluice_datastore.store import Store
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.waiting import eventually


@pytest.fixture
async def clean(postgres: PostgresServer, redis_server: RedisServer) -> None:
    connection = await asyncpg.connect(postgres.url)
    await connection.execute("TRUNCATE tenants, api_keys, conversations, messages, usage")
    await connection.close()
    redis = Redis.from_url(redis_server.url)
    await redis.flushall()
    await redis.aclose()


@dataclass
class Service:
    """One data-access process: its store and a stub for its gRPC API."""

    stub: datastore_pb2_grpc.DataStoreAsyncStub
    store: Store
    local: LocalTenants


async def start_service(
    postgres: PostgresServer, redis_server: RedisServer, **overrides: object
) -> AsyncIterator[Service]:
    settings = DataStoreSettings(
        database_url=postgres.url,
        redis_url=redis_server.url,
        drain_delay_s=0,
        **overrides,  # type: ignore[arg-type]
    )
    database = await Database.connect(settings.database_url, settings.replica_urls, size=4)
    redis = Redis.from_url(settings.redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)
    subscriber = Redis.from_url(settings.redis_url, socket_connect_timeout=0.2)
    local = LocalTenants(settings.local_tenant_ttl_s)
    store = Store(database, redis, Cache(redis, timeout_s=0.2), local, settings)
    listener = asyncio.create_task(local.listen(subscriber))
    await asyncio.wait_for(local.subscribed.wait(), 5)
    server = GrpcServer(settings, [SERVICE_NAME], handle_signals=False)
    server.add(datastore_pb2_grpc.add_DataStoreServicer_to_server, DataStoreServicer(store), SERVICE_NAME)
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Service(datastore_pb2_grpc.DataStoreStub(channel), store, local)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await redis.aclose()
    await subscriber.aclose()
    await database.close()


@pytest.fixture
async def service(clean: None, postgres: PostgresServer, redis_server: RedisServer) -> AsyncIterator[Service]:
    async for running in start_service(postgres, redis_server):
        yield running


@pytest.fixture
async def other_service(clean: None, postgres: PostgresServer, redis_server: RedisServer) -> AsyncIterator[Service]:
    """A second process of the same service (its own memory, the same Redis and PostgreSQL)."""
    async for running in start_service(postgres, redis_server):
        yield running


async def new_tenant(stub: datastore_pb2_grpc.DataStoreAsyncStub, name: str = "acme") -> datastore_pb2.Tenant:
    return await stub.CreateTenant(
        datastore_pb2.CreateTenantRequest(name=name, tier=datastore_pb2.TIER_STANDARD, scheduling_weight=3)
    )


def statements(postgres: PostgresServer, tag: str, since: int) -> int:
    """How many times PostgreSQL ran a tagged query since a byte offset of its log."""
    with postgres.log_path.open("rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return sum(1 for line in text.splitlines() if "execute" in line and f"/* {tag} */" in line)


def log_size(postgres: PostgresServer) -> int:
    return postgres.log_path.stat().st_size


async def log_caught_up(postgres: PostgresServer) -> None:
    """Until PostgreSQL's log holds every statement run so far: it holds a marker statement run after them."""
    since = log_size(postgres)
    marker = f"log marker {uuid.uuid4().hex}"
    connection = await asyncpg.connect(postgres.url)
    try:
        await connection.execute(f"SELECT 1 /* {marker} */")
    finally:
        await connection.close()

    def logged() -> bool:
        with postgres.log_path.open("rb") as log:
            log.seek(since)
            return marker.encode() in log.read()

    await eventually(logged, 5, f"{marker!r} in PostgreSQL's log")
