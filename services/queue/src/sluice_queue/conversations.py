"""Conversations on the public API: earlier turns go before the prompt, the exchange is stored after.

History is read through the data-access service (only the caller's tenant's
conversations); the replica drops its oldest turns if the whole does not fit
the model (reported in the Started event). After a successful finish, the
new messages and the reply are appended, idempotently by request id, before
the caller is told the request finished: a client that sends its next turn
as soon as it sees ``finished`` gets this exchange in the history. When the
data-access service is away, the exchange is kept and appended later, in
order behind any other kept exchange of its conversation, so nothing said is
lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable
from typing import Protocol

import grpc
from prometheus_client import Counter, Gauge

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import NotFound
from sluice_core.ids import canonical_id
from sluice_queue.flushing import Kept, flush_forever

logger = logging.getLogger(__name__)

KEPT = Gauge("sluice_queue_exchanges_kept", "Finished exchanges waiting to be appended to their conversations.")
LOST = Counter(
    "sluice_queue_exchanges_lost", "Exchanges not stored: refused by the data-access service, or over the cap."
)

# The newest turns read; older ones would not fit a model's context anyway.
HISTORY_LIMIT = 256
_RETRY_MAX_S = 5.0
# Answers that a retry will not change (the conversation was deleted, say).
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class ConversationStore(Protocol):
    """The data-access service's conversation calls."""

    def CreateConversation(
        self, request: datastore_pb2.CreateConversationRequest, /, *, timeout: float | None
    ) -> Awaitable[datastore_pb2.Conversation]: ...

    def GetConversation(
        self, request: datastore_pb2.GetConversationRequest, /, *, timeout: float | None
    ) -> AsyncIterable[datastore_pb2.Message]: ...

    def AppendMessages(
        self, request: datastore_pb2.AppendMessagesRequest, /, *, timeout: float
    ) -> Awaitable[datastore_pb2.AppendMessagesResponse]: ...


class Conversations:
    def __init__(
        self,
        datastore: ConversationStore,
        store_timeout_s: float = 2.0,
        retry_interval_s: float = 0.5,
        max_kept: int = 10_000,
    ) -> None:
        self._datastore = datastore
        self._store_timeout_s = store_timeout_s
        self._retry_interval_s = retry_interval_s
        self._max_kept = max_kept
        self._kept: Kept[datastore_pb2.AppendMessagesRequest] = Kept(max_kept, KEPT)
        self._wake = asyncio.Event()

    async def create(self, tenant_id: str, timeout_s: float | None) -> str:
        created = await self._datastore.CreateConversation(
            datastore_pb2.CreateConversationRequest(tenant_id=tenant_id), timeout=timeout_s
        )
        return str(created.id)

    async def history(
        self, conversation_id: str, tenant_id: str, timeout_s: float | None
    ) -> list[common_pb2.ChatMessage]:
        request = datastore_pb2.GetConversationRequest(
            conversation_id=conversation_id, limit=HISTORY_LIMIT, tenant_id=tenant_id
        )
        try:
            return [
                common_pb2.ChatMessage(role=m.role, content=m.content)
                async for m in self._datastore.GetConversation(request, timeout=timeout_s)
            ]
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound("no such conversation for this API key's tenant") from None
            raise

    async def store(
        self,
        conversation_id: str,
        tenant_id: str,
        request_id: str,
        new: list[common_pb2.ChatMessage],
        reply: str,
        reply_tokens: int,
        timeout_s: float | None,
    ) -> None:
        """Append the exchange now; if the data-access service cannot take it, keep it for ``run`` to append."""
        # Kept turns of one conversation are found whatever its spelling (the caller's was checked).
        conversation_id = canonical_id(conversation_id) or conversation_id
        messages = [datastore_pb2.NewMessage(role=m.role, content=m.content) for m in new]
        messages.append(
            datastore_pb2.NewMessage(role=common_pb2.ROLE_ASSISTANT, content=reply, token_count=reply_tokens)
        )
        exchange = datastore_pb2.AppendMessagesRequest(
            conversation_id=conversation_id, tenant_id=tenant_id, request_id=request_id, messages=messages
        )
        if any(kept.conversation_id == conversation_id for kept in self._kept):
            self._keep(exchange)  # an earlier turn goes first
            return
        timeout = self._store_timeout_s if timeout_s is None else min(timeout_s, self._store_timeout_s)
        try:
            await self._datastore.AppendMessages(exchange, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSED:
                LOST.inc()
                logger.error("exchange %s not stored in %s: %s", request_id, conversation_id, exc.details())
            else:
                logger.warning("exchange %s kept to store later (%s %s)", request_id, exc.code().name, exc.details())
                self._keep(exchange)
        except asyncio.CancelledError:
            # The caller left at its last token: the exchange still happened. Whether
            # the append landed is unknown; appends are idempotent by request id.
            self._keep(exchange)
            raise

    def _keep(self, exchange: datastore_pb2.AppendMessagesRequest) -> None:
        dropped = self._kept.add(exchange)
        if dropped is not None:
            LOST.inc()
            logger.error("%d exchanges kept; dropped %s's", self._max_kept, dropped.request_id)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._kept)

    async def run(self) -> None:
        """Append kept exchanges, oldest first, backing off while the data-access service fails."""
        await flush_forever(self.flush, self._wake, self._retry_interval_s, _RETRY_MAX_S, lambda: bool(self._kept))

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Append what is kept, in order; False (the rest kept) if the data-access service failed."""
        while self._kept:
            (exchange,) = self._kept.oldest()
            try:
                await self._datastore.AppendMessages(exchange, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _REFUSED:
                    return False
                LOST.inc()
                logger.error("exchange %s not stored: %s", exchange.request_id, exc.details())
            self._kept.remove_oldest()
        return True
