"""Migrations: applied once, in order, and an edited applied migration is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from sluice_cli.postgres_server import PostgresServer
from sluice_datastore import migrate as migrator


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


async def test_an_edited_migration_is_refused(
    empty_database: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrator.migrate(empty_database)
    original = migrator.migrations()
    edited = [migrator.Migration(m.version, m.name, m.sql + "\n-- edited") for m in original]
    monkeypatch.setattr(migrator, "migrations", lambda: edited)
    with pytest.raises(migrator.MigrationError, match="changed after it was applied"):
        await migrator.migrate(empty_database)
