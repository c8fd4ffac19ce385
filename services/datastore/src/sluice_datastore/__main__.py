"""``sluice-datastore``: serve the DataStore API (``sluice-datastore migrate`` only applies migrations)."""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from sluice.datastore.v1 import datastore_pb2_grpc
from sluice_core.logs import setup_logging
from sluice_core.redis_pool import pooled_redis
from sluice_core.server import GrpcServer
from sluice_core.service import cancel, run
from sluice_datastore import SERVICE_NAME
from sluice_datastore.cache import Cache
from sluice_datastore.database import Database
from sluice_datastore.invalidation import LocalTenants
from sluice_datastore.migrate import migrate
from sluice_datastore.servicer import DataStoreServicer
from sluice_datastore.settings import DataStoreSettings
from sluice_datastore.store import Store


async def apply_migrations(settings: DataStoreSettings) -> None:
    database = await Database.connect(settings.database_url, size=1)
    try:
        async with database.primary.acquire() as connection:
            await migrate(connection)
    finally:
        await database.close()


async def serve(settings: DataStoreSettings) -> None:
    if settings.migrate_on_start:
        await apply_migrations(settings)
    timeout_s = settings.redis_timeout_ms / 1e3
    database = await Database.connect(
        settings.database_url, settings.replica_urls, settings.pool_size, settings.statement_timeout_ms, warm=True
    )
    # A burst waits (as long as a call may take) for a free connection.
    redis = pooled_redis(settings.redis_url, 64, timeout_s, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    # The subscription blocks on reads: it must not share the short timeout.
    subscriber = Redis.from_url(settings.redis_url, socket_connect_timeout=timeout_s)
    local = LocalTenants(settings.local_tenant_ttl_s)
    store = Store(database, redis, Cache(redis, timeout_s=timeout_s, jitter=settings.ttl_jitter), local, settings)
    server = GrpcServer(settings, health_names=[SERVICE_NAME])
    server.add(datastore_pb2_grpc.add_DataStoreServicer_to_server, DataStoreServicer(store), SERVICE_NAME)
    listener = asyncio.create_task(local.listen(subscriber))
    try:
        async with server:
            await server.set_serving(True)
            await server.wait_for_stop()
    finally:
        await cancel(listener)
        await redis.aclose()
        await subscriber.aclose()
        await database.close()


def main() -> None:
    settings = DataStoreSettings()
    if sys.argv[1:] == ["migrate"]:
        setup_logging("datastore", settings.log_level, settings.log_format)
        asyncio.run(apply_migrations(settings))
        return
    run("datastore", settings, lambda: serve(settings))


if __name__ == "__main__":
    main()
