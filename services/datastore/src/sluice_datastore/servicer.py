"""The ``sluice.datastore.v1.DataStore`` servicer: checks input, converts protobuf, calls the store."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_core.errors import FieldViolation, InvalidArgument, NotFound
from sluice_core.ids import MALFORMED, canonical_id
from sluice_core.messages import ROLE_NAMES
from sluice_datastore.records import MessageRecord, TenantRecord, UsageRecord
from sluice_datastore.store import Store

Context = grpc.aio.ServicerContext[Any, Any]
MAX_ID_LEN = 128
MAX_BATCH = 1000
MAX_MESSAGES = 256
MAX_INT = 2**31 - 1  # an integer column
MAX_STATUS_LEN = 32
# The columns are int32, except tokens_per_minute: the rate-limit API carries a limit as a uint32.
DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_TENANT_NAME = 200
# A weight is a share of the slots against other tenants': a thousand to one is as uneven as a
# deployment needs, and a weight of 2^31 would put one tenant ahead of everyone for good.
TENANT_MAXIMA = {"scheduling_weight": 1000, "requests_per_minute": 2**31 - 1, "tokens_per_minute": 2**32 - 1}


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


def _id(value: str, field: str, out: list[FieldViolation]) -> str:
    """The id in one spelling (``canonical_id``), or a violation."""
    canonical = canonical_id(value)
    if canonical is None:
        out.append(FieldViolation(field, MALFORMED))
        return value
    return canonical


def _raise(violations: Sequence[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


class DataStoreServicer(datastore_pb2_grpc.DataStoreServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def GetTenantByApiKey(
        self, request: datastore_pb2.GetTenantByApiKeyRequest, context: Context
    ) -> datastore_pb2.Tenant:
        if not request.api_key or len(request.api_key) > 256:
            raise InvalidArgument.field("api_key", "must be given, at most 256 characters")
        tenant = await self._store.tenant_by_api_key(request.api_key)
        if tenant is None:
            raise NotFound("unknown or revoked API key")
        return _tenant(tenant)

    async def CreateConversation(
        self, request: datastore_pb2.CreateConversationRequest, context: Context
    ) -> datastore_pb2.Conversation:
        violations: list[FieldViolation] = []
        tenant_id = _id(request.tenant_id, "tenant_id", violations)
        _raise(violations)
        record = await self._store.create_conversation(tenant_id)
        return datastore_pb2.Conversation(
            id=record.id, tenant_id=record.tenant_id, created_at=_timestamp(record.created_at)
        )

    async def GetConversation(
        self, request: datastore_pb2.GetConversationRequest, context: Context
    ) -> AsyncIterator[datastore_pb2.Message]:
        violations: list[FieldViolation] = []
        conversation_id = _id(request.conversation_id, "conversation_id", violations)
        tenant_id = _id(request.tenant_id, "tenant_id", violations)
        _raise(violations)
        view = await self._store.conversation(conversation_id, request.limit, tenant_id)
        for message in view.messages:
            yield _message(message)

    async def AppendMessages(
        self, request: datastore_pb2.AppendMessagesRequest, context: Context
    ) -> datastore_pb2.AppendMessagesResponse:
        violations: list[FieldViolation] = []
        conversation_id = _id(request.conversation_id, "conversation_id", violations)
        tenant_id = _id(request.tenant_id, "tenant_id", violations)
        if not request.request_id or len(request.request_id) > MAX_ID_LEN:
            violations.append(FieldViolation("request_id", f"must be given, at most {MAX_ID_LEN} characters"))
        if not 1 <= len(request.messages) <= MAX_MESSAGES:
            violations.append(FieldViolation("messages", f"between 1 and {MAX_MESSAGES} messages"))
        for i, message in enumerate(request.messages):
            if message.role not in ROLE_NAMES:
                violations.append(FieldViolation(f"messages[{i}].role", "ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"))
            if message.token_count > MAX_INT:
                violations.append(FieldViolation(f"messages[{i}].token_count", f"at most {MAX_INT}"))
        _raise(violations)
        # PostgreSQL's text cannot hold NUL, which a model's reply (a byte-level tokenizer's
        # output) or a caller's message may contain: it is kept as the replacement character,
        # as undecodable bytes are, rather than the exchange being refused and lost.
        messages = [(m.role, m.content.replace("\x00", "\ufffd"), m.token_count) for m in request.messages]
        seqs = await self._store.append_messages(conversation_id, tenant_id, request.request_id, messages)
        return datastore_pb2.AppendMessagesResponse(sequences=seqs)

    async def RecordUsage(
        self, request_iterator: AsyncIterator[datastore_pb2.RecordUsageRequest], context: Context
    ) -> datastore_pb2.RecordUsageResponse:
        recorded = duplicates = 0
        async for batch in request_iterator:
            records = [_usage(record, f"records[{i}]") for i, record in enumerate(batch.records)]
            if len(records) > MAX_BATCH:
                raise InvalidArgument.field("records", f"at most {MAX_BATCH} records a batch")
            new = await self._store.record_usage(records)
            recorded += new
            duplicates += len(records) - new
        return datastore_pb2.RecordUsageResponse(recorded=recorded, duplicates=duplicates)

    async def CreateTenant(self, request: datastore_pb2.CreateTenantRequest, context: Context) -> datastore_pb2.Tenant:
        violations: list[FieldViolation] = []
        if not 1 <= len(request.name) <= MAX_TENANT_NAME:
            violations.append(FieldViolation("name", f"must be 1 to {MAX_TENANT_NAME} characters"))
        if request.tier == datastore_pb2.TIER_UNSPECIFIED:
            violations.append(FieldViolation("tier", "must be set"))
        for name, largest in TENANT_MAXIMA.items():
            if getattr(request, name) > largest:
                violations.append(FieldViolation(name, f"must be at most {largest}"))
        _raise(violations)
        tenant = await self._store.create_tenant(
            request.name,
            request.tier,
            request.scheduling_weight or 1,
            request.requests_per_minute,
            request.tokens_per_minute,
        )
        return _tenant(tenant)

    async def GetTenant(self, request: datastore_pb2.GetTenantRequest, context: Context) -> datastore_pb2.Tenant:
        violations: list[FieldViolation] = []
        which = request.WhichOneof("tenant")
        if which is None:
            violations.append(FieldViolation("id", "give the tenant's id or name"))
        tenant_id = _id(request.id, "id", violations) if which == "id" else None
        _raise(violations)
        tenant = await self._store.tenant(tenant_id, request.name or None)
        if tenant is None:
            raise NotFound(f"no tenant {request.id or request.name!r}")
        return _tenant(tenant)

    async def IssueApiKey(
        self, request: datastore_pb2.IssueApiKeyRequest, context: Context
    ) -> datastore_pb2.IssueApiKeyResponse:
        violations: list[FieldViolation] = []
        tenant_id = _id(request.tenant_id, "tenant_id", violations)
        _raise(violations)
        api_key, key_id = await self._store.issue_key(tenant_id)
        return datastore_pb2.IssueApiKeyResponse(api_key=api_key, key_id=key_id)

    async def RevokeApiKey(
        self, request: datastore_pb2.RevokeApiKeyRequest, context: Context
    ) -> datastore_pb2.RevokeApiKeyResponse:
        which = request.WhichOneof("key")
        violations: list[FieldViolation] = []
        if which is None:
            violations.append(FieldViolation("api_key", "give the key or its key_id"))
        key_id = _id(request.key_id, "key_id", violations) if which == "key_id" else None
        _raise(violations)
        revoked = await self._store.revoke_key(request.api_key or None, key_id)
        return datastore_pb2.RevokeApiKeyResponse(revoked=revoked)

    async def ListTenants(
        self, request: datastore_pb2.ListTenantsRequest, context: Context
    ) -> datastore_pb2.ListTenantsResponse:
        violations: list[FieldViolation] = []
        limit = _page(request.limit, violations)
        if len(request.after) > MAX_TENANT_NAME:
            violations.append(FieldViolation("after", f"a tenant's name: at most {MAX_TENANT_NAME} characters"))
        _raise(violations)
        tenants = await self._store.tenants(limit, request.after)
        return datastore_pb2.ListTenantsResponse(tenants=[_tenant(t) for t in tenants])

    async def ListApiKeys(
        self, request: datastore_pb2.ListApiKeysRequest, context: Context
    ) -> datastore_pb2.ListApiKeysResponse:
        violations: list[FieldViolation] = []
        tenant_id = _id(request.tenant_id, "tenant_id", violations)
        limit = _page(request.limit, violations)
        _raise(violations)
        keys = await self._store.keys(tenant_id, limit)
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


def _page(limit: int, out: list[FieldViolation]) -> int:
    """A page's size: 0 is the default; more than the most is refused, not cut (the caller would miss rows)."""
    if limit > MAX_PAGE:
        out.append(FieldViolation("limit", f"at most {MAX_PAGE}"))
    return limit or DEFAULT_PAGE


def _usage(record: datastore_pb2.UsageRecord, field: str) -> UsageRecord:
    violations: list[FieldViolation] = []
    if not record.request_id or len(record.request_id) > MAX_ID_LEN:
        violations.append(FieldViolation(f"{field}.request_id", f"must be given, at most {MAX_ID_LEN} characters"))
    tenant_id = _id(record.tenant_id, f"{field}.tenant_id", violations)
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        if getattr(record, name) > MAX_INT:
            violations.append(FieldViolation(f"{field}.{name}", f"at most {MAX_INT}"))
    if record.cached_tokens > record.prompt_tokens:
        violations.append(FieldViolation(f"{field}.cached_tokens", "cannot exceed prompt_tokens"))
    timings = (record.queue_ms, record.time_to_first_token_ms, record.total_ms)
    if not all(math.isfinite(t) and t >= 0 for t in timings):
        violations.append(FieldViolation(f"{field}.timings", "must be finite and not negative"))
    if not 1 <= len(record.status) <= MAX_STATUS_LEN:
        violations.append(FieldViolation(f"{field}.status", f"must be given, at most {MAX_STATUS_LEN} characters"))
    finished = datetime.now(UTC)
    if record.HasField("finished_at"):
        try:
            finished = record.finished_at.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            violations.append(FieldViolation(f"{field}.finished_at", "not a time between the years 1 and 9999"))
    _raise(violations)
    return UsageRecord(
        record.request_id,
        tenant_id,
        record.model,
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.queue_ms,
        record.time_to_first_token_ms,
        record.total_ms,
        record.status,
        finished,
    )
