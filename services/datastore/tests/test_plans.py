"""With realistic volumes, every hot query uses its index: no sequential scan of a big table."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from sluice_datastore.migrate import migrate
from sluice_datastore.plans import HOT_QUERIES, HotQuery, nodes, plan, seed
from sluice_devstack.postgres_server import PostgresServer

BIG_TABLES = {"messages", "usage", "api_keys"}


@pytest.fixture(scope="module")
async def seeded(postgres: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    admin = await asyncpg.connect(postgres.url)
    await admin.execute("DROP DATABASE IF EXISTS plans")
    await admin.execute("CREATE DATABASE plans")
    await admin.close()
    connection = await asyncpg.connect(postgres.url.rsplit("/", 1)[0] + "/plans")
    await migrate(connection)
    await seed(connection)
    yield connection
    await connection.close()


async def test_the_seed_has_the_volumes_of_the_plan_test(seeded: asyncpg.Connection) -> None:
    assert await seeded.fetchval("SELECT count(*) FROM messages") == 100_000
    assert await seeded.fetchval("SELECT count(DISTINCT conversation_id) FROM messages") == 1000
    assert await seeded.fetchval("SELECT count(*) FROM usage") == 100_000


@pytest.mark.parametrize("query", HOT_QUERIES, ids=[q.name for q in HOT_QUERIES])
async def test_hot_queries_use_their_index(seeded: asyncpg.Connection, query: HotQuery) -> None:
    found = nodes((await plan(seeded, query))["Plan"])
    scanned = {n.get("Relation Name") for n in found if n["Node Type"] == "Seq Scan"}
    assert not scanned & BIG_TABLES, f"{query.name} scans {scanned & BIG_TABLES} sequentially"
    assert query.index in {n.get("Index Name") for n in found}, f"{query.name} does not use {query.index}"
