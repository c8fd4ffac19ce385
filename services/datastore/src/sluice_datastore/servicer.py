"""The ``sluice.datastore.v1.DataStore`` servicer: protobuf in, checked (``validation``), the store, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_core.errors import NotFound
from sluice_datastore import validation
from sluice_datastore.records import MessageRecord, TenantRecord
from sluice_datastore.store import Store

Context = grpc.aio.ServicerContext[Any, Any]


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _tenant(record: TenantRecord) -> datastore_pb2.Tenant:
    return datastore_pb2.Tenant(
        id=record.id,
        name=record.name,
        tier=record.tier,  # type: ignore[arg-type]
        scheduling_weight=record.scheduling_weight,
        requests_per_minute=record.requests_per_minute,
        tokens_per_minute=record.tokens_per_minute,
        created_at=_timestamp(record.created_at),
    )


def _message(record: MessageRecord) -> datastore_pb2.Message:
    return datastore_pb2.Message(
        sequence=record.seq,
        role=record.role,  # type: ignore[arg-type]
        content=record.content,
        token_count=record.token_count,
        created_at=_timestamp(record.created_at),
    )


class DataStoreServicer(datastore_pb2_grpc.DataStoreServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def GetTenantByApiKey(
        self, request: datastore_pb2.GetTenantByApiKeyRequest, context: Context
    ) -> datastore_pb2.Tenant:
        tenant = await self._store.tenant_by_api_key(validation.api_key(request))
        if tenant is None:
            raise NotFound("unknown or revoked API key")
        return _tenant(tenant)

    async def CreateConversation(
        self, request: datastore_pb2.CreateConversationRequest, context: Context
    ) -> datastore_pb2.Conversation:
        record = await self._store.create_conversation(validation.tenant_id(request.tenant_id))
        return datastore_pb2.Conversation(
            id=record.id, tenant_id=record.tenant_id, created_at=_timestamp(record.created_at)
        )

    async def GetConversation(
        self, request: datastore_pb2.GetConversationRequest, context: Context
    ) -> AsyncIterator[datastore_pb2.Message]:
        conversation_id, tenant_id = validation.conversation(request)
        view = await self._store.conversation(conversation_id, request.limit, tenant_id)
        for message in view.messages:
            yield _message(message)

    async def AppendMessages(
        self, request: datastore_pb2.AppendMessagesRequest, context: Context
    ) -> datastore_pb2.AppendMessagesResponse:
        new = validation.new_messages(request)
        seqs = await self._store.append_messages(new.conversation_id, new.tenant_id, new.request_id, new.messages)
        return datastore_pb2.AppendMessagesResponse(sequences=seqs)

    async def RecordUsage(
        self, request_iterator: AsyncIterator[datastore_pb2.RecordUsageRequest], context: Context
    ) -> datastore_pb2.RecordUsageResponse:
        recorded = duplicates = 0
        async for batch in request_iterator:
            records = validation.usage_batch(batch)
            new = await self._store.record_usage(records)
            recorded += new
            duplicates += len(records) - new
        return datastore_pb2.RecordUsageResponse(recorded=recorded, duplicates=duplicates)

    async def CreateTenant(self, request: datastore_pb2.CreateTenantRequest, context: Context) -> datastore_pb2.Tenant:
        new = validation.new_tenant(request)
        tenant = await self._store.create_tenant(
            new.name, new.tier, new.scheduling_weight, new.requests_per_minute, new.tokens_per_minute
        )
        return _tenant(tenant)

    async def GetTenant(self, request: datastore_pb2.GetTenantRequest, context: Context) -> datastore_pb2.Tenant:
        tenant = await self._store.tenant(*validation.tenant_lookup(request))
        if tenant is None:
            raise NotFound(f"no tenant {request.id or request.name!r}")
        return _tenant(tenant)

    async def IssueApiKey(
        self, request: datastore_pb2.IssueApiKeyRequest, context: Context
    ) -> datastore_pb2.IssueApiKeyResponse:
        api_key, key_id = await self._store.issue_key(validation.tenant_id(request.tenant_id))
        return datastore_pb2.IssueApiKeyResponse(api_key=api_key, key_id=key_id)

    async def RevokeApiKey(
        self, request: datastore_pb2.RevokeApiKeyRequest, context: Context
    ) -> datastore_pb2.RevokeApiKeyResponse:
        revoked = await self._store.revoke_key(*validation.key_to_revoke(request))
        return datastore_pb2.RevokeApiKeyResponse(revoked=revoked)

    async def ListTenants(
        self, request: datastore_pb2.ListTenantsRequest, context: Context
    ) -> datastore_pb2.ListTenantsResponse:
        tenants = await self._store.tenants(*validation.tenants_page(request))
        return datastore_pb2.ListTenantsResponse(tenants=[_tenant(t) for t in tenants])

    async def ListApiKeys(
        self, request: datastore_pb2.ListApiKeysRequest, context: Context
    ) -> datastore_pb2.ListApiKeysResponse:
        keys = await self._store.keys(*validation.keys_page(request))
        return datastore_pb2.ListApiKeysResponse(
            keys=[
                datastore_pb2.ApiKey(
                    key_id=k.id,
                    created_at=_timestamp(k.created_at),
                    revoked_at=_timestamp(k.revoked_at) if k.revoked_at is not None else None,
                )
                for k in keys
            ]
        )
