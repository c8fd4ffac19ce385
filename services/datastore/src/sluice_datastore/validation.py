"""Checking the DataStore API's requests into what the store is given.

Every problem with a request is collected and reported at once as
INVALID_ARGUMENT, each naming its field. Ids come back in one spelling
(``canonical_id``): they are cache keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import FieldViolation, InvalidArgument
from sluice_core.ids import MALFORMED, canonical_id
from sluice_core.messages import ROLE_NAMES
from sluice_datastore.records import UsageRecord

MAX_API_KEY_LEN = 256
MAX_ID_LEN = 128
MAX_BATCH = 1000
MAX_MESSAGES = 256
MAX_INT = 2**31 - 1  # an integer column
MAX_STATUS_LEN = 32
DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_TENANT_NAME = 200
# The columns are int32, except tokens_per_minute: the rate-limit API carries a limit as a uint32.
# A weight is a share of the slots against other tenants': a thousand to one is as uneven as a
# deployment needs, and a weight of 2^31 would put one tenant ahead of everyone for good.
TENANT_MAXIMA = {"scheduling_weight": 1000, "requests_per_minute": 2**31 - 1, "tokens_per_minute": 2**32 - 1}


@dataclass(frozen=True)
class NewTenant:
    name: str
    tier: int
    scheduling_weight: int
    requests_per_minute: int
    tokens_per_minute: int


@dataclass(frozen=True)
class NewMessages:
    conversation_id: str
    tenant_id: str
    request_id: str
    messages: Sequence[tuple[int, str, int]]  # (role, content, token_count)


def api_key(request: datastore_pb2.GetTenantByApiKeyRequest) -> str:
    if not request.api_key or len(request.api_key) > MAX_API_KEY_LEN:
        raise InvalidArgument.field("api_key", f"must be given, at most {MAX_API_KEY_LEN} characters")
    return request.api_key


def tenant_id(value: str) -> str:
    """The tenant's id, where it is all a request gives."""
    violations: list[FieldViolation] = []
    canonical = _id(value, "tenant_id", violations)
    _raise(violations)
    return canonical


def conversation(request: datastore_pb2.GetConversationRequest) -> tuple[str, str]:
    """The conversation's id and its tenant's."""
    violations: list[FieldViolation] = []
    conversation_id = _id(request.conversation_id, "conversation_id", violations)
    tenant_id = _id(request.tenant_id, "tenant_id", violations)
    _raise(violations)
    return conversation_id, tenant_id


def new_messages(request: datastore_pb2.AppendMessagesRequest) -> NewMessages:
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
    return NewMessages(conversation_id, tenant_id, request.request_id, messages)


def usage_batch(batch: datastore_pb2.RecordUsageRequest) -> list[UsageRecord]:
    records = [_usage(record, f"records[{i}]") for i, record in enumerate(batch.records)]
    if len(records) > MAX_BATCH:
        raise InvalidArgument.field("records", f"at most {MAX_BATCH} records a batch")
    return records


def _usage(record: datastore_pb2.UsageRecord, field: str) -> UsageRecord:
    """One usage record, ``field`` naming it in the request; finished now unless it says when."""
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


def new_tenant(request: datastore_pb2.CreateTenantRequest) -> NewTenant:
    """The tenant to create; a weight of 0 is the default, 1."""
    violations: list[FieldViolation] = []
    if not 1 <= len(request.name) <= MAX_TENANT_NAME:
        violations.append(FieldViolation("name", f"must be 1 to {MAX_TENANT_NAME} characters"))
    if request.tier == datastore_pb2.TIER_UNSPECIFIED:
        violations.append(FieldViolation("tier", "must be set"))
    for name, largest in TENANT_MAXIMA.items():
        if getattr(request, name) > largest:
            violations.append(FieldViolation(name, f"must be at most {largest}"))
    _raise(violations)
    return NewTenant(
        request.name,
        request.tier,
        request.scheduling_weight or 1,
        request.requests_per_minute,
        request.tokens_per_minute,
    )


def tenant_lookup(request: datastore_pb2.GetTenantRequest) -> tuple[str | None, str | None]:
    """The tenant's id or its name, whichever the request gives."""
    violations: list[FieldViolation] = []
    which = request.WhichOneof("tenant")
    if which is None:
        violations.append(FieldViolation("id", "give the tenant's id or name"))
    tenant_id = _id(request.id, "id", violations) if which == "id" else None
    _raise(violations)
    return tenant_id, request.name or None


def key_to_revoke(request: datastore_pb2.RevokeApiKeyRequest) -> tuple[str | None, str | None]:
    """The key itself or its key_id, whichever the request gives."""
    violations: list[FieldViolation] = []
    which = request.WhichOneof("key")
    if which is None:
        violations.append(FieldViolation("api_key", "give the key or its key_id"))
    key_id = _id(request.key_id, "key_id", violations) if which == "key_id" else None
    _raise(violations)
    return request.api_key or None, key_id


def tenants_page(request: datastore_pb2.ListTenantsRequest) -> tuple[int, str]:
    """How many tenants, and the name they come after."""
    violations: list[FieldViolation] = []
    limit = _page(request.limit, violations)
    if len(request.after) > MAX_TENANT_NAME:
        violations.append(FieldViolation("after", f"a tenant's name: at most {MAX_TENANT_NAME} characters"))
    _raise(violations)
    return limit, request.after


def keys_page(request: datastore_pb2.ListApiKeysRequest) -> tuple[str, int]:
    """Whose keys, and how many."""
    violations: list[FieldViolation] = []
    tenant_id = _id(request.tenant_id, "tenant_id", violations)
    limit = _page(request.limit, violations)
    _raise(violations)
    return tenant_id, limit


def _id(value: str, field: str, out: list[FieldViolation]) -> str:
    """The id in one spelling (``canonical_id``), or a violation."""
    canonical = canonical_id(value)
    if canonical is None:
        out.append(FieldViolation(field, MALFORMED))
        return value
    return canonical


def _page(limit: int, out: list[FieldViolation]) -> int:
    """A page's size: 0 is the default; more than the most is refused, not cut (the caller would miss rows)."""
    if limit > MAX_PAGE:
        out.append(FieldViolation("limit", f"at most {MAX_PAGE}"))
    return limit or DEFAULT_PAGE


def _raise(violations: Sequence[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)
