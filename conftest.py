"""Session-wide test set-up shared by every package's tests."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import pytest

from sluice_core.telemetry import setup_tracing
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import free_ports

# A tracer provider, as every service's main installs, so that in-process
# servers in the tests record spans (and return trace ids) as in production.
# Nothing is exported: there is no OTLP endpoint.
setup_tracing("sluice-tests", "tests", otlp_endpoint=None)


@pytest.fixture(scope="session")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """A Redis of the tests' own, on a free port: tests may stop and restart it."""
    server = RedisServer(free_ports(1)[0], tmp_path_factory.mktemp("redis"))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of the tests' own, migrated; it logs every statement, so tests can count queries."""
    server = PostgresServer(free_ports(1)[0], tmp_path_factory.mktemp("postgres"), durable=False, log_statements=True)
    await server.start()
    # As operators migrate: this file is shared by every package's tests, which import no service.
    env = {**os.environ, "SLUICE_DATASTORE_DATABASE_URL": server.url}
    migrating = await asyncio.create_subprocess_exec(sys.executable, "-m", "sluice_datastore", "migrate", env=env)
    assert await migrating.wait() == 0, "python -m sluice_datastore migrate failed"
    yield server
    await server.stop()
    server.remove_data()
