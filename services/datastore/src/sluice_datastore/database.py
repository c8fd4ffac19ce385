"""PostgreSQL access: a primary pool for writes, replica pools for reads, and the queries.

Every query here is one the request path runs; each has the index it needs
(``migrations/0001_initial.sql``), and ``plans.py`` prints their plans.
Database failures become UNAVAILABLE (the caller may retry: writes are
idempotent by request id); rows the constraints refuse become
INVALID_ARGUMENT, a missing parent NOT_FOUND, a duplicate name ALREADY_EXISTS.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from sluice_core.errors import AlreadyExists, InvalidArgument, NotFound, SluiceError, Unavailable
from sluice_datastore.records import (
    ConversationRecord,
    ConversationView,
    KeyRecord,
    MessageRecord,
    TenantRecord,
    UsageRecord,
)

logger = logging.getLogger(__name__)

# The hot queries, tagged so that they can be found in PostgreSQL's logs and plans.
TENANT_BY_KEY = """/* tenant_by_key */
SELECT t.id::text, t.name, t.tier, t.scheduling_weight, t.requests_per_minute, t.tokens_per_minute, t.created_at
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
WHERE k.key_hash = $1 AND k.revoked_at IS NULL"""

CONVERSATION = """/* conversation */
SELECT id::text, tenant_id::text, created_at FROM conversations WHERE id = $1"""

NEWEST_MESSAGES = """/* newest_messages */
SELECT seq, role, content, token_count, created_at FROM messages
WHERE conversation_id = $1 ORDER BY seq DESC LIMIT $2"""

# The owner and the newest messages in one round trip (no messages: one row of NULLs).
CONVERSATION_VIEW = """/* conversation_view */
SELECT c.tenant_id::text, m.seq, m.role, m.content, m.token_count, m.created_at
FROM conversations c
LEFT JOIN LATERAL (
    SELECT seq, role, content, token_count, created_at FROM messages
    WHERE conversation_id = c.id ORDER BY seq DESC LIMIT $2) m ON true
WHERE c.id = $1"""

ALL_MESSAGES = """/* all_messages */
SELECT seq, role, content, token_count, created_at FROM messages
WHERE conversation_id = $1 ORDER BY seq"""

APPENDED = """/* appended */
SELECT seq FROM messages WHERE conversation_id = $1 AND request_id = $2 ORDER BY seq"""

LAST_SEQ = """/* last_seq */
SELECT coalesce(max(seq), 0) FROM messages WHERE conversation_id = $1"""

RECORD_USAGE = """/* record_usage */
INSERT INTO usage (request_id, tenant_id, model, prompt_tokens, completion_tokens, cached_tokens,
                   queue_ms, time_to_first_token_ms, total_ms, status, finished_at)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::int[], $6::int[],
                     $7::float8[], $8::float8[], $9::float8[], $10::text[], $11::timestamptz[])
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id"""

LOCK_CONVERSATION = """/* lock_conversation */
SELECT 1 FROM conversations WHERE id = $1 AND tenant_id = $2 FOR UPDATE"""

INSERT_MESSAGE = """/* insert_message */
INSERT INTO messages (conversation_id, seq, role, content, token_count, request_id)
VALUES ($1, $2, $3, $4, $5, $6)"""

# Prepared on every new connection: a statement's first use in a connection cost a
# request 8 ms (idle machine) to 35 ms (under load) here, PostgreSQL loading the
# tables' catalog entries and asyncpg looking up the parameters' types.
HOT_READS = (TENANT_BY_KEY, CONVERSATION_VIEW)
HOT_WRITES = (LOCK_CONVERSATION, APPENDED, LAST_SEQ, INSERT_MESSAGE, RECORD_USAGE)

USAGE_BY_TENANT = """/* usage_by_tenant */
SELECT count(*), coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage
WHERE tenant_id = $1 AND finished_at >= $2 AND finished_at < $3"""

_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    # A connection caught mid-operation by a server that went away.
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)


_TAKEN = {"tenants_name_key": "a tenant with this name already exists; choose another name"}


def _translate(exc: Exception) -> SluiceError | None:
    # In the API's words: PostgreSQL's own ("Key (name)=(acme) already exists") name tables and columns.
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound("what it refers to does not exist (deleted meanwhile?)")
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists(_TAKEN.get(exc.constraint_name or "", "it already exists"))
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.DataError):
        return InvalidArgument.field(getattr(exc, "column_name", None) or "request", f"refused by the database: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return Unavailable("the database is unavailable; retry shortly", retry_after_s=1.0)
    return None


@asynccontextmanager
async def _errors() -> AsyncIterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = _translate(exc)
        if mapped is None:
            raise
        raise mapped from exc


def _tenant(row: asyncpg.Record) -> TenantRecord:
    return TenantRecord(*row)


class Database:
    def __init__(self, primary: asyncpg.Pool, replicas: Sequence[asyncpg.Pool] = ()) -> None:
        self.primary = primary
        self._pools = [primary, *replicas]
        self._readers = itertools.cycle(list(replicas) or [primary])

    @classmethod
    async def connect(
        cls,
        primary_url: str,
        replica_urls: Sequence[str] = (),
        size: int = 10,
        statement_timeout_ms: int = 2000,
        warm: bool = False,
    ) -> Database:
        """Pools for the primary and the replicas; with ``warm``, each new connection prepares the hot statements."""
        settings = {"statement_timeout": str(statement_timeout_ms)}

        async def pool(url: str, statements: Sequence[str]) -> asyncpg.Pool:
            async def prepare(connection: asyncpg.Connection) -> None:
                for statement in statements:
                    try:
                        await connection.prepare(statement)
                    except asyncpg.PostgresError as exc:  # the schema is not migrated yet, say
                        logger.warning("could not prepare %s: %s", statement.split("*/")[0], exc)

            return await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=size,
                server_settings=settings,
                timeout=5,
                # The server's statement timeout cannot end a query on a server that stalled
                # (stopped, or its disk hung): the client gives up a little after it would have.
                command_timeout=statement_timeout_ms / 1e3 + 0.5,
                init=prepare if warm else None,
            )

        async with _errors():
            return cls(
                await pool(primary_url, HOT_READS + HOT_WRITES), [await pool(url, HOT_READS) for url in replica_urls]
            )

    async def close(self) -> None:
        for pool in self._pools:
            await pool.close()

    def reader(self, fresh: bool = False) -> asyncpg.Pool:
        """A replica, or the primary when asked for data just written."""
        return self.primary if fresh else next(self._readers)

    async def tenant_by_key_hash(self, key_hash: bytes) -> TenantRecord | None:
        async with _errors():
            row = await self.reader().fetchrow(TENANT_BY_KEY, key_hash)
        return _tenant(row) if row is not None else None

    async def tenant(self, tenant_id: str | None, name: str | None) -> TenantRecord | None:
        async with _errors():
            row = await self.primary.fetchrow(
                """SELECT id::text, name, tier, scheduling_weight, requests_per_minute, tokens_per_minute, created_at
                   FROM tenants WHERE id = $1::uuid OR name = $2""",
                tenant_id,
                name,
            )
        return _tenant(row) if row is not None else None

    async def tenants(self, limit: int, after: str) -> list[TenantRecord]:
        async with _errors():
            rows = await self.primary.fetch(
                """SELECT id::text, name, tier, scheduling_weight, requests_per_minute, tokens_per_minute, created_at
                   FROM tenants WHERE name > $1 ORDER BY name LIMIT $2""",
                after,
                limit,
            )
        return [_tenant(row) for row in rows]

    async def keys(self, tenant_id: str, limit: int) -> list[KeyRecord]:
        async with _errors():
            rows = await self.primary.fetch(
                """SELECT id::text, created_at, revoked_at FROM api_keys
                   WHERE tenant_id = $1::uuid ORDER BY created_at DESC LIMIT $2""",
                tenant_id,
                limit,
            )
        return [KeyRecord(*row) for row in rows]

    async def revoke_key(self, key_id: str | None, key_hash: bytes | None) -> tuple[bool, bytes | None]:
        """Revoke a key by id or hash; returns whether it was active, and its hash (for the caches)."""
        async with _errors():
            row = await self.primary.fetchrow(
                """UPDATE api_keys SET revoked_at = now()
                   WHERE (id = $1::uuid OR key_hash = $2) AND revoked_at IS NULL
                   RETURNING key_hash""",
                key_id,
                key_hash,
            )
        return (row is not None, bytes(row["key_hash"]) if row is not None else None)

    async def create_tenant(self, name: str, tier: int, weight: int, rpm: int, tpm: int) -> TenantRecord:
        async with _errors():
            row = await self.primary.fetchrow(
                """INSERT INTO tenants (id, name, tier, scheduling_weight, requests_per_minute, tokens_per_minute)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   RETURNING id::text, name, tier, scheduling_weight, requests_per_minute, tokens_per_minute,
                             created_at""",
                uuid.uuid4(),
                name,
                tier,
                weight,
                rpm,
                tpm,
            )
        assert row is not None  # INSERT ... RETURNING returns its row or raises
        return _tenant(row)

    async def issue_key(self, tenant_id: str, key_hash: bytes) -> str:
        key_id = uuid.uuid4()
        async with _errors():
            await self.primary.execute(
                "INSERT INTO api_keys (id, key_hash, tenant_id) VALUES ($1, $2, $3::uuid)", key_id, key_hash, tenant_id
            )
        return str(key_id)

    async def create_conversation(self, tenant_id: str) -> ConversationRecord:
        async with _errors():
            row = await self.primary.fetchrow(
                """INSERT INTO conversations (id, tenant_id) VALUES ($1, $2::uuid)
                   RETURNING id::text, tenant_id::text, created_at""",
                uuid.uuid4(),
                tenant_id,
            )
        assert row is not None  # INSERT ... RETURNING returns its row or raises
        return ConversationRecord(*row)

    async def conversation_view(self, conversation_id: str, limit: int, fresh: bool) -> ConversationView | None:
        """The conversation's owner and its newest ``limit`` messages (0: all), oldest first."""
        pool = self.reader(fresh)
        async with _errors():
            if limit:
                rows = await pool.fetch(CONVERSATION_VIEW, conversation_id, limit)
                if not rows:
                    return None
                messages = [MessageRecord(*row[1:]) for row in reversed(rows) if row["seq"] is not None]
                return ConversationView(rows[0]["tenant_id"], tuple(messages))
            async with pool.acquire() as connection:
                owner = await connection.fetchrow(CONVERSATION, conversation_id)
                if owner is None:
                    return None
                every = await connection.fetch(ALL_MESSAGES, conversation_id)
            return ConversationView(owner["tenant_id"], tuple(MessageRecord(*row) for row in every))

    async def append_messages(
        self, conversation_id: str, tenant_id: str, request_id: str, messages: Sequence[tuple[int, str, int]]
    ) -> list[int]:
        """Append after the last message; a request id seen before returns what it appended then."""
        async with _errors(), self.primary.acquire() as connection, connection.transaction():
            # One append at a time per conversation: the row lock orders them.
            locked = await connection.fetchval(LOCK_CONVERSATION, conversation_id, tenant_id)
            if locked is None:
                raise NotFound(f"no conversation {conversation_id} of this tenant")
            before = [r["seq"] for r in await connection.fetch(APPENDED, conversation_id, request_id)]
            if before:
                return before
            last = await connection.fetchval(LAST_SEQ, conversation_id)
            seqs = list(range(last + 1, last + 1 + len(messages)))
            await connection.executemany(
                INSERT_MESSAGE,
                [
                    (conversation_id, seq, role, content, tokens, request_id)
                    for seq, (role, content, tokens) in zip(seqs, messages, strict=True)
                ],
            )
        return seqs

    async def record_usage(self, records: Sequence[UsageRecord]) -> int:
        """Write a batch in one statement (one transaction); returns how many were new."""
        columns: list[list[Any]] = [[] for _ in range(11)]
        for r in records:
            values = (r.request_id, r.tenant_id, r.model, r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                      r.queue_ms, r.time_to_first_token_ms, r.total_ms, r.status, r.finished_at)  # fmt: skip
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        async with _errors():
            written = await self.primary.fetch(RECORD_USAGE, *columns)
        return len(written)
