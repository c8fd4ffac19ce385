"""``sluice-datastore [serve]``: serve the DataStore API; ``sluice-datastore migrate`` only applies migrations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from redis.asyncio import Redis

from sluice.datastore.v1 import datastore_pb2_grpc
from sluice_core.redis_pool import pooled_redis
from sluice_core.server import GrpcServer
from sluice_core.service import cancel, freeze_heap, run
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
    async with contextlib.AsyncExitStack() as stack:
        database = await Database.connect(
            settings.database_url, settings.replica_urls, settings.pool_size, settings.statement_timeout_ms, warm=True
        )
        stack.push_async_callback(database.close)
        # A burst waits (as long as a call may take) for a free connection.
        redis = pooled_redis(
            settings.redis_url, 64, timeout_s, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        stack.push_async_callback(redis.aclose)
        # The subscription blocks on reads: it must not share the short timeout.
        subscriber = Redis.from_url(settings.redis_url, socket_connect_timeout=timeout_s)
        stack.push_async_callback(subscriber.aclose)
        local = LocalTenants(settings.local_tenant_ttl_s)
        store = Store(database, redis, Cache(redis, timeout_s=timeout_s, jitter=settings.ttl_jitter), local, settings)
        server = GrpcServer(settings, health_names=[SERVICE_NAME])
        server.add(datastore_pb2_grpc.add_DataStoreServicer_to_server, DataStoreServicer(store), SERVICE_NAME)
        listener = asyncio.create_task(local.listen(subscriber))
        stack.push_async_callback(cancel, listener)
        await stack.enter_async_context(server)
        freeze_heap()
        await server.set_serving(True)
        await server.wait_for_stop()


COMMANDS = {"serve": serve, "migrate": apply_migrations}


def main() -> None:
    parser = argparse.ArgumentParser(prog="sluice-datastore", description=__doc__)
    parser.add_argument(
        "command", nargs="?", choices=COMMANDS, default="serve", help="serve (the default) or only migrate"
    )
    command = COMMANDS[parser.parse_args().command]
    settings = DataStoreSettings()
    run("datastore", settings, lambda: command(settings))


if __name__ == "__main__":
    main()
