"""What a generation needs from the rest of its queue replica, each as the narrowest protocol it uses.

The replica passes its own parts (``Authenticator``, ``Scheduler`` and its
``Ticket``, ``Engines``, ``Budgets``, ``Conversations``, ``UsageRecorder``,
the inference stub); a test may pass anything with these methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core.background import Background
from sluice_queue.auth import Metadata
from sluice_queue.budget import Reservation
from sluice_queue.ledger import Draft
from sluice_queue.replica_stream import InferenceCall


class TenantLookup(Protocol):
    """Who is calling, from the call's metadata."""

    async def tenant(self, metadata: Metadata | None) -> datastore_pb2.Tenant: ...


class Inference(Protocol):
    """The inference stub's streaming call."""

    def Generate(self, request: inference_pb2.GenerateRequest, /, *, timeout: float | None) -> InferenceCall: ...


class Place(Protocol):
    """A request's place in the waiting line, then its slot."""

    @property
    def admitted(self) -> bool: ...

    def positions(self) -> AsyncIterator[int]: ...

    async def release(self) -> None: ...


class Line(Protocol):
    """The waiting line and the slots that all queue replicas share."""

    async def enter(
        self, request_id: str, tenant_id: str, weight: int, priority: generation_pb2.Priority.ValueType
    ) -> Place: ...


class Models(Protocol):
    """What the inference replicas serve."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    def seen(self, replica_id: str) -> None: ...


class TenantBudgets(Protocol):
    """Tenants' token and request budgets."""

    async def reserve(
        self, tenant: datastore_pb2.Tenant, tokens: int, timeout_s: float | None
    ) -> Reservation | None: ...

    def settle(self, reservation: Reservation, used: int) -> None: ...


class ConversationLog(Protocol):
    """Conversations: created, read as history, and appended to."""

    async def create(self, tenant_id: str, timeout_s: float | None) -> str: ...

    async def history(
        self, conversation_id: str, tenant_id: str, timeout_s: float | None
    ) -> list[common_pb2.ChatMessage]: ...

    async def store(
        self,
        conversation_id: str,
        tenant_id: str,
        request_id: str,
        new: list[common_pb2.ChatMessage],
        reply: str,
        reply_tokens: int,
        timeout_s: float | None,
    ) -> None: ...


class UsageSink(Protocol):
    """Where usage records go: drafts while a request runs, then its final record."""

    def open(self, request_id: str, draft: Draft) -> None: ...

    async def commit(self, record: datastore_pb2.UsageRecord, timeout_s: float) -> bool: ...

    def record(self, record: datastore_pb2.UsageRecord) -> None: ...


@dataclass(frozen=True)
class Dependencies:
    """Everything the generations of one queue replica share."""

    auth: TenantLookup
    inference: Inference
    scheduler: Line
    engines: Models
    budgets: TenantBudgets
    conversations: ConversationLog
    usage: UsageSink
    # How long a finished request's caller waits for its usage record to be written.
    usage_commit_s: float = 1.0
    background: Background = field(default_factory=lambda: Background("work after a request"))
