"""Conversations on the public API: earlier turns go before the prompt, the exchange is stored after.

History is read through the data-access service (only the caller's tenant's
conversations); the replica drops its oldest turns if the whole does not fit
the model (reported in the Started event). After a successful finish, the
new messages and the reply are appended, idempotently by request id.
"""

from __future__ import annotations

import grpc

from sluice.common.v1 import generation_pb2 as common_pb2
from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_core.errors import NotFound

# The newest turns read; older ones would not fit a model's context anyway.
HISTORY_LIMIT = 256


class Conversations:
    def __init__(self, datastore: datastore_pb2_grpc.DataStoreAsyncStub) -> None:
        self._datastore = datastore

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
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise NotFound(f"no conversation {conversation_id!r} for this API key's tenant") from None
            raise

    async def append(
        self, conversation_id: str, request_id: str, new: list[common_pb2.ChatMessage], reply: str, reply_tokens: int
    ) -> None:
        messages = [datastore_pb2.NewMessage(role=m.role, content=m.content) for m in new]
        messages.append(
            datastore_pb2.NewMessage(role=common_pb2.ROLE_ASSISTANT, content=reply, token_count=reply_tokens)
        )
        await self._datastore.AppendMessages(
            datastore_pb2.AppendMessagesRequest(
                conversation_id=conversation_id, request_id=request_id, messages=messages
            ),
            timeout=10.0,
        )
