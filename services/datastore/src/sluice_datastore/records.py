"""The rows the data-access service hands out, and how they travel through the cache (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class TenantRecord:
    id: str
    name: str
    tier: int
    scheduling_weight: int
    requests_per_minute: int
    tokens_per_minute: int
    created_at: datetime


@dataclass(frozen=True)
class KeyRecord:
    id: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class MessageRecord:
    seq: int
    role: int
    content: str
    token_count: int
    created_at: datetime


@dataclass(frozen=True)
class ConversationRecord:
    id: str
    tenant_id: str
    created_at: datetime


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    status: str
    finished_at: datetime


def _plain(record: Any) -> dict[str, Any]:
    values = asdict(record)
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}


def tenant_to_json(tenant: TenantRecord | None) -> str:
    return json.dumps(_plain(tenant) if tenant is not None else None)


def tenant_from_json(text: str) -> TenantRecord | None:
    data = json.loads(text)
    if data is None:
        return None
    return TenantRecord(**{**data, "created_at": datetime.fromisoformat(data["created_at"])})


@dataclass(frozen=True)
class ConversationView:
    """A conversation and its newest messages, as cached."""

    tenant_id: str
    messages: tuple[MessageRecord, ...]


def view_to_json(view: ConversationView | None) -> str:
    if view is None:
        return "null"
    return json.dumps({"tenant_id": view.tenant_id, "messages": [_plain(m) for m in view.messages]})


def view_from_json(text: str) -> ConversationView | None:
    data = json.loads(text)
    if data is None:
        return None
    messages = tuple(
        MessageRecord(**{**m, "created_at": datetime.fromisoformat(m["created_at"])}) for m in data["messages"]
    )
    return ConversationView(data["tenant_id"], messages)
