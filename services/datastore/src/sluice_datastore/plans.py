"""The hot queries' plans: seed realistic volumes, then EXPLAIN each query.

``python -m sluice_datastore.plans [--seed]`` prints the plans against the
database in ``SLUICE_DATASTORE_DATABASE_URL`` (``--seed`` first adds 100,000
messages across 1,000 conversations, 100,000 usage records and 10,000 API
keys, in tenants named ``plans-*``). The tests assert on the same plans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from sluice_datastore import database as queries
from sluice_datastore.migrate import migrate
from sluice_datastore.settings import DataStoreSettings


@dataclass(frozen=True)
class HotQuery:
    name: str
    sql: str
    # SQL that picks realistic arguments from the seeded data.
    arguments: str
    index: str  # the index the plan must use


HOT_QUERIES = (
    HotQuery("tenant by API key", queries.TENANT_BY_KEY, "SELECT key_hash FROM api_keys LIMIT 1", "api_keys_key_hash"),
    HotQuery(
        "newest 20 messages",
        queries.NEWEST_MESSAGES,
        "SELECT conversation_id, 20 FROM messages ORDER BY random() LIMIT 1",
        "messages_pkey",
    ),
    HotQuery("conversation", queries.CONVERSATION, "SELECT id FROM conversations LIMIT 1", "conversations_pkey"),
    HotQuery(
        "conversation with its newest 20 messages",
        queries.CONVERSATION_VIEW,
        "SELECT id, 20 FROM conversations ORDER BY random() LIMIT 1",
        "messages_pkey",
    ),
    HotQuery(
        "append: already appended?",
        queries.APPENDED,
        "SELECT conversation_id, request_id FROM messages LIMIT 1",
        "messages_request",
    ),
    HotQuery(
        "append: last sequence", queries.LAST_SEQ, "SELECT conversation_id FROM messages LIMIT 1", "messages_pkey"
    ),
    HotQuery(
        "tenant usage over a day",
        queries.USAGE_BY_TENANT,
        "SELECT tenant_id, now() - interval '1 day', now() FROM usage LIMIT 1",
        "usage_tenant_finished",
    ),
)


async def seed(connection: asyncpg.Connection, conversations: int = 1000, per_conversation: int = 100) -> None:
    """Tenants, keys, conversations with messages and usage, in bulk, then ANALYZE."""
    await connection.execute(
        """
        INSERT INTO tenants (id, name) SELECT gen_random_uuid(), 'plans-' || i FROM generate_series(1, 100) i;
        INSERT INTO api_keys (id, key_hash, tenant_id)
            SELECT gen_random_uuid(), sha256(('plans-key-' || i)::bytea), t.id
            FROM generate_series(1, 10000) i
            JOIN LATERAL (SELECT id FROM tenants WHERE name = 'plans-' || (1 + i % 100)) t ON true;
        INSERT INTO usage (request_id, tenant_id, model, prompt_tokens, completion_tokens, cached_tokens,
                           queue_ms, time_to_first_token_ms, total_ms, status, finished_at)
            SELECT 'plans-' || i, t.id, 'tiny', 100, 50, 0, 1, 20, 300, 'stop', now() - (i || ' seconds')::interval
            FROM generate_series(1, 100000) i
            JOIN LATERAL (SELECT id FROM tenants WHERE name = 'plans-' || (1 + i % 100)) t ON true;
        """
    )
    await connection.execute(
        """
        WITH c AS (
            INSERT INTO conversations (id, tenant_id)
            SELECT gen_random_uuid(), (SELECT id FROM tenants WHERE name = 'plans-1') FROM generate_series(1, $1)
            RETURNING id)
        INSERT INTO messages (conversation_id, seq, role, content, token_count, request_id)
        SELECT c.id, s, 1 + s % 2, repeat('words ', 20), 20, 'plans-' || ((s + 1) / 2)
        FROM c, generate_series(1, $2) s
        """,
        conversations,
        per_conversation,
    )
    await connection.execute("ANALYZE")


async def sample_arguments(connection: asyncpg.Connection, query: HotQuery) -> asyncpg.Record:
    """Realistic arguments for ``query``, picked from the data."""
    arguments = await connection.fetchrow(query.arguments)
    if arguments is None:
        raise LookupError(f"no data to pick arguments for {query.name!r} from; seed the database first (--seed)")
    return arguments


async def plan(connection: asyncpg.Connection, query: HotQuery, analyze: bool = False) -> dict[str, Any]:
    arguments = await sample_arguments(connection, query)
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    raw = await connection.fetchval(f"EXPLAIN ({options}) {query.sql}", *arguments)
    result: dict[str, Any] = json.loads(raw)[0]
    return result


def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]


async def main_async(seed_first: bool) -> None:
    settings = DataStoreSettings()
    connection = await asyncpg.connect(settings.database_url)
    try:
        await migrate(connection)
        if seed_first:
            await seed(connection)
        for query in HOT_QUERIES:
            arguments = await sample_arguments(connection, query)
            rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {query.sql}", *arguments)
            lines = "\n".join(row[0] for row in rows)
            print(f"-- {query.name}\n{query.sql}\n\n{lines}\n")  # noqa: T201 - it is a command
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", action="store_true", help="first add the test volumes")
    args = parser.parse_args()
    asyncio.run(main_async(args.seed))


if __name__ == "__main__":
    main()
