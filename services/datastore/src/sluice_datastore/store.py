"""The data-access service's operations: memory, then Redis, then PostgreSQL; writes invalidate.

Tenant lookups by API key are the hottest call (every request): answered from
this process's memory when it is subscribed to invalidations, else from
Redis, else from PostgreSQL, once for any number of concurrent callers.
Unknown keys are cached too, briefly, so a flood of random keys never reaches
PostgreSQL. Conversations are cached per (conversation, newest N); appending
deletes them, and the conversation is then read from the primary for a few
seconds (read-your-writes with replicas).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence

from redis.asyncio import Redis

from sluice_core.errors import NotFound
from sluice_datastore.cache import Cache, Codec
from sluice_datastore.database import Database
from sluice_datastore.invalidation import LocalTenants, publish
from sluice_datastore.records import (
    ConversationRecord,
    ConversationView,
    KeyRecord,
    TenantRecord,
    UsageRecord,
    tenant_from_json,
    tenant_to_json,
    view_from_json,
    view_to_json,
)
from sluice_datastore.settings import DataStoreSettings

TENANTS = Codec(tenant_to_json, tenant_from_json)
VIEWS = Codec(view_to_json, view_from_json)
KEY_PREFIX = "sk-"


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Store:
    def __init__(
        self, database: Database, redis: Redis, cache: Cache, local: LocalTenants, settings: DataStoreSettings
    ) -> None:
        self._db = database
        self._redis = redis
        self._cache = cache
        self._local = local
        self._settings = settings
        self._written: dict[str, float] = {}  # conversation id -> read from the primary until

    async def tenant_by_api_key(self, api_key: str) -> TenantRecord | None:
        key_hash = hash_key(api_key)
        known, tenant = self._local.get(key_hash)
        if known:
            return tenant
        tenant = await self._cache.get_or_load(
            "tenant",
            f"sluice:ds:tenant:{key_hash.hex()}",
            lambda: self._db.tenant_by_key_hash(key_hash),
            TENANTS,
            self._settings.tenant_ttl_s,
            negative_ttl_s=self._settings.negative_ttl_s,
        )
        ttl = self._settings.local_tenant_ttl_s if tenant is not None else self._settings.negative_ttl_s
        self._local.put(key_hash, tenant, ttl)
        return tenant

    async def create_tenant(self, name: str, tier: int, weight: int, rpm: int, tpm: int) -> TenantRecord:
        return await self._db.create_tenant(name, tier, weight, rpm, tpm)

    async def tenant(self, tenant_id: str | None, name: str | None) -> TenantRecord | None:
        return await self._db.tenant(tenant_id, name)

    async def tenants(self, limit: int, after: str) -> list[TenantRecord]:
        return await self._db.tenants(limit, after)

    async def keys(self, tenant_id: str, limit: int) -> list[KeyRecord]:
        return await self._db.keys(tenant_id, limit)

    async def issue_key(self, tenant_id: str) -> tuple[str, str]:
        api_key = new_key()
        key_hash = hash_key(api_key)
        key_id = await self._db.issue_key(tenant_id, key_hash)
        # The key may have been looked up (and remembered as unknown) before it existed.
        await self._forget_tenant(key_hash)
        return api_key, key_id

    async def revoke_key(self, api_key: str | None, key_id: str | None) -> bool:
        revoked, key_hash = await self._db.revoke_key(key_id, hash_key(api_key) if api_key else None)
        if key_hash is not None:
            await self._forget_tenant(key_hash)
        return revoked

    async def _forget_tenant(self, key_hash: bytes) -> None:
        self._local.drop(key_hash)
        await self._cache.invalidate(f"sluice:ds:tenant:{key_hash.hex()}")
        await publish(self._redis, key_hash, self._settings.redis_timeout_ms / 1e3)

    async def create_conversation(self, tenant_id: str) -> ConversationRecord:
        return await self._db.create_conversation(tenant_id)

    async def conversation(self, conversation_id: str, limit: int, tenant_id: str) -> ConversationView:
        fresh = self._written.get(conversation_id, 0.0) > time.monotonic()
        if fresh:
            view = await self._db.conversation_view(conversation_id, limit, fresh=True)
        else:
            view = await self._cache.get_or_load(
                "conversation",
                f"sluice:ds:conv:{conversation_id}",
                lambda: self._db.conversation_view(conversation_id, limit, fresh=False),
                VIEWS,
                self._settings.conversation_ttl_s,
                negative_ttl_s=self._settings.negative_ttl_s,
                field=str(limit),
            )
        if view is None or view.tenant_id != tenant_id:
            raise NotFound(f"no conversation {conversation_id} of this tenant")
        return view

    async def append_messages(
        self, conversation_id: str, tenant_id: str, request_id: str, messages: Sequence[tuple[int, str, int]]
    ) -> list[int]:
        seqs = await self._db.append_messages(conversation_id, tenant_id, request_id, messages)
        self._written[conversation_id] = time.monotonic() + self._settings.read_your_writes_s
        await self._cache.invalidate(f"sluice:ds:conv:{conversation_id}")
        if len(self._written) > 10_000:
            now = time.monotonic()
            self._written = {k: t for k, t in self._written.items() if t > now}
        return seqs

    async def record_usage(self, records: Sequence[UsageRecord]) -> int:
        return await self._db.record_usage(records)
