"""Migrations: applied once, in order, and an edited applied migration is refused; the hot statements match."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sluice_datastore import migrate as migrator
from sluice_datastore.database import Database
from sluice_devstack.postgres_server import PostgresServer


@pytest.fixture
async def empty_database(postgres: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    admin = await asyncpg.connect(postgres.url)
    await admin.execute("DROP DATABASE IF EXISTS migrate_test")
    await admin.execute("CREATE DATABASE migrate_test")
    await admin.close()
    connection = await asyncpg.connect(postgres.url.rsplit("/", 1)[0] + "/migrate_test")
    yield connection
    await connection.close()


async def test_applies_everything_once(empty_database: asyncpg.Connection) -> None:
    applied = await migrator.migrate(empty_database)
    assert [m.version for m in applied] == [m.version for m in migrator.migrations()]
    assert await migrator.migrate(empty_database) == []
    tables = {
        r["tablename"]
        for r in await empty_database.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert {"tenants", "api_keys", "conversations", "messages", "usage", "schema_migrations"} <= tables


async def test_the_migrate_command_applies_the_migrations(
    empty_database: asyncpg.Connection, postgres: PostgresServer
) -> None:
    url = postgres.url.rsplit("/", 1)[0] + "/migrate_test"
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice_datastore", "migrate", env={**os.environ, "SLUICE_DATASTORE_DATABASE_URL": url}
    )
    assert await asyncio.wait_for(command.wait(), 60) == 0
    applied = await empty_database.fetchval("SELECT count(*) FROM schema_migrations")
    assert applied == len(migrator.migrations())


async def test_an_edited_migration_is_refused(
    empty_database: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrator.migrate(empty_database)
    original = migrator.migrations()
    edited = [migrator.Migration(m.version, m.name, m.sql + "\n-- edited") for m in original]
    monkeypatch.setattr(migrator, "migrations", lambda: edited)
    with pytest.raises(migrator.MigrationError, match="changed after it was applied"):
        await migrator.migrate(empty_database)


async def test_every_hot_statement_prepares_against_the_migrated_schema(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sluice_datastore.database"):
        database = await Database.connect(postgres.url, warm=True)
        await database.close()
    assert not caplog.records, "a hot statement no longer matches the schema"


async def test_a_warm_pool_still_connects_before_the_schema_exists(
    empty_database: asyncpg.Connection, postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sluice_datastore.database"):
        database = await Database.connect(postgres.url.rsplit("/", 1)[0] + "/migrate_test", warm=True)
    assert await database.primary.fetchval("SELECT 1") == 1
    await database.close()
    assert "could not prepare" in caplog.text
